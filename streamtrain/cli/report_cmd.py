"""`streamtrain report RUN_DIR`: the run's history as a self-contained HTML page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamtrain.cli import exit_codes
from streamtrain.cli.common import print_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report", help="draw a run directory's history as one self-contained HTML page",
        description="Reads <RUN_DIR>/timeseries/ (written by `streamtrain run` and `demo` as they run) and the "
                    "reference curves <RUN_DIR>/oracle.jsonl / baselines.jsonl when present, and writes "
                    "<OUT>/index.html with every plot embedded, plus the plots as PNGs beside it: window AUC vs "
                    "oracle and baselines, label ratios, PSI per feature, loss, throughput and lag, freshness, "
                    "gate transitions, checkpoints and versions. Works on a live run directory too.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the daemon's run_dir, e.g. runs/demo")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write (default: RUN_DIR/report)")
    parser.add_argument("--json", action="store_true", help="print {\"report\": path, \"plots\": [...]} as JSON")
    parser.set_defaults(func=_report)


def _report(args: argparse.Namespace) -> int:
    from streamtrain.report.page import NoHistoryError, write_report  # matplotlib: only when drawing
    from streamtrain.report.plots import PLOTS

    try:
        page = write_report(args.run_dir, args.out)
    except NoHistoryError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    if args.json:
        print_json({"report": str(page), "plots": [str(page.parent / f"{p.name}.png") for p in PLOTS]})
    else:
        print(page)
    return 0
