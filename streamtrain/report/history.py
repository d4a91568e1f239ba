"""The run history a daemon leaves in its run directory, and how to read it back.

The daemon writes it as it runs (``streamtrain/runtime/timeseries.py``); ``streamtrain
report`` reads it. This module owns the layout, so writer and reader cannot disagree on
it. JSON lines under ``<run_dir>/timeseries/``; every row has ``t`` (unix seconds),
``samples`` (samples trained when it was written) and ``ts_ms`` (event time then, ms;
null before the first event):

``status.jsonl``  one row per loop turn, at most one per second: ``run`` (the wall time the
    process started: tells a restart's rows apart), ``steps``,
    ``samples_per_s`` (since the previous row of the same process), ``events``, ``dlq``,
    ``lag`` (sums over partitions), ``loss`` ({part: value}), ``freshness_s`` (mean wall
    time from event to trained, over the interval), ``join_latency_s`` (mean event time
    from exposure to the watermark that released its sample), ``gate`` ("open" | "frozen"),
    ``checkpoint`` and ``version`` (names, or null).
``windows-<monitor>.jsonl``  one row per closed window of that monitor: ``window``,
    ``rows`` (samples the monitor had seen: exposures only), ``judged``, ``ok``,
    ``alarm``, ``warming_up``, ``reason``, ``metrics`` ({"auc/ctr": 0.71, ...}; NaN as null).
``events.jsonl``  what changed between two loop turns, by ``kind``: ``start``
    (``resumed_from``), ``checkpoint`` (``name``, ``count`` written since the last turn),
    ``checkpoint_failed`` (``count``), ``version`` (``name``, ``number``: CURRENT moved,
    by a release or a rollback), ``gate`` (``from``, ``to``, ``reason``, ``monitors``,
    ``manual``, ``seq``).

Does not: render anything (``report.plots`` / ``report.page`` do) or bound the files (the
writer does; the reader takes whatever is there).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

TIMESERIES_DIR = "timeseries"
STATUS_FILE = "status.jsonl"
EVENTS_FILE = "events.jsonl"
WINDOWS_PREFIX = "windows-"


def window_file(monitor: str) -> str:
    return f"{WINDOWS_PREFIX}{monitor}.jsonl"


Row = dict[str, Any]
_NEVER = 2**63  # more samples than any run trains


@dataclass(frozen=True)
class History:
    """A run's rows, as the report draws them (see :func:`load_history`)."""

    status: list[Row] = field(default_factory=list)
    windows: dict[str, list[Row]] = field(default_factory=dict)  # monitor -> rows, by window index
    events: list[Row] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.status or self.windows or self.events)


def read_rows(path: Path) -> list[Row]:
    """Every parsable JSON object of a JSON-lines file, in file order (a torn last line,
    left by a crash mid-write, is skipped); [] when the file does not exist."""
    return list(_parse(path))


def _parse(path: Path) -> Iterator[Row]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for line in data.splitlines():
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(row, dict):
            yield row


def load_history(run_dir: Path) -> History:
    """The history under ``run_dir``, with what a restart replayed kept once.

    After a crash the daemon resumes from its last checkpoint and trains the samples after
    it again, writing their rows a second time. Status rows: a run's rows are dropped from
    the point a later run started again (the replay superseded them), so curves over
    samples run forward.
    Window rows: one per window index, the last written (a replay reproduces its verdicts).
    Events are kept as written: a checkpoint a killed process wrote did exist.
    """
    root = run_dir / TIMESERIES_DIR
    windows = {path.name[len(WINDOWS_PREFIX):-len(".jsonl")]: _one_per_window(read_rows(path))
               for path in sorted(root.glob(f"{WINDOWS_PREFIX}*.jsonl"))}
    return History(status=_not_superseded(read_rows(root / STATUS_FILE)), windows=windows,
                   events=read_rows(root / EVENTS_FILE))


def _not_superseded(rows: list[Row]) -> list[Row]:
    """Drop the rows of a run that a later run trained over again: those with at least as
    many samples as the later run started from."""
    runs = [row.get("run") for row in rows]
    first_samples: dict[Any, int] = {}
    for run, row in zip(runs, rows):
        first_samples[run] = min(first_samples.get(run, _NEVER), int(row.get("samples", 0)))
    later: dict[Any, int] = {}  # run -> fewest samples any later run started from
    fewest = _NEVER
    for run in reversed(list(first_samples)):
        later[run] = fewest
        fewest = min(fewest, first_samples[run])
    return [row for run, row in zip(runs, rows) if int(row.get("samples", 0)) < later[run]]


def _one_per_window(rows: list[Row]) -> list[Row]:
    latest = {int(r["window"]): r for r in rows if "window" in r}
    return [latest[w] for w in sorted(latest)]
