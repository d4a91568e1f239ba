"""`streamtrain run`: the long-running training daemon."""

from __future__ import annotations

import argparse
import dataclasses

from streamtrain.cli.common import add_config_flags, config_from_args, print_json, stop_event_on_signals
from streamtrain.cli.logs import live_console


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run", help="run the training daemon (consume, join, train, monitor, checkpoint, publish)",
        description="Resume from the newest intact checkpoint under checkpoints.root (or --from), seek every "
                    "partition to its saved offset and train until SIGTERM/Ctrl-C, which finishes the current "
                    "step, writes a checkpoint and exits 0. A second signal exits at once. A finite log whose "
                    "partitions all end with an end-of-input marker (streamtrain replay and `simulate "
                    "--end-of-input` write them; see docs/events.md) is trained to its last sample, then the "
                    "daemon checkpoints and exits 0.")
    add_config_flags(parser)
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--from", dest="resume_from", metavar="CKPT", help="resume from this checkpoint name instead of LATEST")
    start.add_argument("--warm-start", metavar="daily|daily:YYYY-MM-DD|CKPT|PATH",
                       help="new run from a checkpoint's model and embeddings, but not its offsets")
    parser.add_argument("--stop-after-samples", type=int, metavar="N",
                        help="stop (with a final checkpoint) once N samples are trained: a deterministic end point")
    parser.add_argument("--json", action="store_true", help="print the run summary as one JSON object")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from streamtrain.runtime import Daemon  # heavy imports (torch) only when running
    from streamtrain.runtime.live import StatusView

    config = config_from_args(args)
    daemon = Daemon(config, stop=stop_event_on_signals(), resume_from=args.resume_from,
                    warm_start=args.warm_start, stop_after_samples=args.stop_after_samples)
    view = StatusView(daemon.status, console=live_console()).start()  # live panel on a terminal, status logs otherwise
    try:
        summary = daemon.run()
    finally:
        view.stop()
    if args.json:
        print_json(dataclasses.asdict(summary))
    return 0
