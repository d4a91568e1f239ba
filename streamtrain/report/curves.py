"""Reference AUC curves the report draws beside the model's window AUC.

The file contract, for writers outside the daemon: ``streamtrain demo`` writes the
simulator's oracle, ``bench/quality.py`` (or anything else) its baselines. JSON lines in
the run directory, one object per window:

``<run_dir>/oracle.jsonl``     the oracle: the AUC of the simulator's true probabilities
``<run_dir>/baselines.jsonl``  baselines (online MF, item popularity, ...); one file may
                               hold several curves

``{"name": "online_mf", "rows": 40000, "auc_ctr": 0.712, "auc_ctcvr": 0.688}``

* ``name``: the curve's label in the legend;
* ``rows``: exposure rows scored up to the end of the window, counted like the AUC
  monitor's ``rows`` (its ``sample_count``: exposures in the order the trainer saw them,
  correction rows excluded). The report places a point where the model's window with the
  same ``rows`` is; windows of ``monitors.auc.window`` rows over the same rows make the
  curves comparable point by point;
* ``auc_ctr``: AUC of the P(click) scores against click over the window's rows;
* ``auc_ctcvr`` (optional): AUC of P(click & convert) against click x convert.
A null or missing AUC (a window without both classes) is a gap. Lines that do not parse
are skipped. The writer bounds its own file (the demo's runs are minutes long).

Does not: compute any AUC (writers do) or read the daemon's history (``history`` does).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import orjson

from streamtrain.report.history import Row, read_rows

ORACLE_FILE = "oracle.jsonl"
BASELINES_FILE = "baselines.jsonl"


class CurveWriter:
    """Appends one curve's windows to a contract file (one line per window, flushed)."""

    def __init__(self, path: Path, name: str) -> None:
        self.path = path
        self.name = name

    def append(self, rows: int, auc_ctr: float | None, auc_ctcvr: float | None = None) -> None:
        line = {"name": self.name, "rows": int(rows), "auc_ctr": _finite(auc_ctr), "auc_ctcvr": _finite(auc_ctcvr)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(orjson.dumps(line) + b"\n")


def read_curves(run_dir: Path) -> dict[str, list[Row]]:
    """Curve name -> its windows ordered by ``rows`` (oracle first, then baselines)."""
    curves: dict[str, list[Row]] = {}
    for file in (ORACLE_FILE, BASELINES_FILE):
        for row in read_rows(run_dir / file):
            if isinstance(row.get("name"), str) and isinstance(row.get("rows"), int):
                curves.setdefault(row["name"], []).append(row)
    return {name: sorted(rows, key=lambda r: r["rows"]) for name, rows in curves.items()}


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
