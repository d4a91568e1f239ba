"""Writes the run history that ``streamtrain report`` draws, into ``<run_dir>/timeseries/``.

Fed by the daemon: :meth:`TimeSeries.turn` with each loop turn's status snapshot,
:meth:`TimeSeries.window` with each closed monitor window. The layout and row fields are
those of :mod:`streamtrain.report.history` (which reads them back).

Does not: take part in training state. It is an observer's log: never checkpointed,
never read by the daemon, and a replay after a crash writes its rows again (the reader
keeps the replay's). A write that fails (disk full) is logged and dropped; training goes on.

Bound, for a daemon that runs for months: each file is compacted when it reaches its row
cap, so the run directory holds at most ``status_rows + windows_rows x monitors +
events_rows`` rows (about 10 MB at the defaults with a few features: a status row is
~0.4 kB, a window row 0.3-1 kB, growing with the number of features for drift windows).

* status and window rows are *thinned*: the file is rewritten with under half the cap's
  rows, evenly spaced over the whole run (one per power-of-two bucket of wall time for
  status rows, of window index for windows), so it keeps covering the run at a coarser
  resolution. A status row a second gives 1 s resolution for the first hour (4096 rows),
  then 2-4 s, ... about 20-40 min after a month; the rows since the last compaction stay
  at full resolution.
* events are *rolled*: the oldest half is dropped. A checkpoint or a gate transition is a
  fact, not a sample of a curve; thinning every other one would pair a freeze with the
  wrong unfreeze. 8192 events hold a month of 5-minute checkpoints; status rows keep the
  gate state for the whole run regardless.

Rows are the snapshot's values, not deltas (except ``samples_per_s`` and the latency
means, which cover the interval since the previous row of this process), so a thinned
file still plots correctly.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from prometheus_client import Histogram

from monitors.verdict import Verdict
from streamtrain.report.history import EVENTS_FILE, STATUS_FILE, TIMESERIES_DIR, window_file
from streamtrain.runtime.status import DaemonStatus

log = logging.getLogger(__name__)

STATUS_EVERY_S = 1.0  # a status row per second at most: the loop turns every ~0.05-0.5 s
STATUS_ROWS = 4096  # an hour at full resolution
WINDOWS_ROWS = 2048  # per monitor: 40M samples in 20k-sample windows before the first thinning
EVENTS_ROWS = 8192
# Verdict metric kinds the report draws; the others (z-scores, counts, js, missing and
# repeat rates) stay in the log and on /metrics, not in the bounded files.
WINDOW_METRIC_KINDS = frozenset({"auc", "auc_baseline", "logloss", "calibration", "rate", "baseline", "psi"})
MAX_REASON_CHARS = 500  # gate reasons name every alarm; a bound keeps one event row bounded too


class BoundedJsonLines:
    """A JSON-lines file capped at ``max_rows``. At the cap it is rewritten (atomically):

    * ``thin_by=KEY``: to about half the cap, rows evenly spaced in ``KEY`` (a number that
      grows along the file: wall time, window index) over the *whole* file, the first and
      the last row kept. The spacing comes from the file alone, so old rows are not thinned
      again and again while new ones stay dense, and a restarted daemon needs no state;
    * ``thin_by=None``: to its newer half (the oldest rows are dropped).
    """

    def __init__(self, path: Path, max_rows: int, *, thin_by: str | None) -> None:
        if max_rows < 4:
            raise ValueError("max_rows must be at least 4")
        self.path = path
        self.max_rows = max_rows
        self.thin_by = thin_by
        self.rows = self._count_and_repair()

    def _count_and_repair(self) -> int:
        """Rows already there (a restarted daemon appends); a torn last line is cut off so
        the next row starts on a line of its own."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            self._replace(data)
        return data.count(b"\n")

    def append(self, row: Mapping[str, Any]) -> None:
        line = orjson.dumps(row, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"
        if self.rows >= self.max_rows:
            self._compact()
        with open(self.path, "ab") as f:
            f.write(line)
        self.rows += 1

    def _compact(self) -> None:
        lines = self.path.read_bytes().splitlines(keepends=True)
        if self.thin_by is None:
            kept = lines[len(lines) // 2:]
        else:
            keys = [_key(line, self.thin_by) for line in lines]
            kept = [lines[i] for i in _evenly_spaced(keys, self.max_rows // 2)]
        self._replace(b"".join(kept))
        self.rows = len(kept)

    def _replace(self, data: bytes) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)


def _key(line: bytes, name: str) -> float:
    try:
        value = orjson.loads(line).get(name)
    except (orjson.JSONDecodeError, AttributeError):
        return math.nan
    return float(value) if isinstance(value, (int, float)) else math.nan


def _evenly_spaced(keys: list[float], target: int) -> list[int]:
    """Indices of fewer than ``target`` rows: the first row of each bucket of ``step`` keys,
    ``step`` the smallest power of two that leaves fewer buckets than ``target``; the last
    row is always kept. Buckets start at key 0 and a power-of-two step only ever doubles, so
    each compaction's buckets are unions of the previous one's: rows thinned once are not
    thinned unevenly again, and the result depends on the keys alone (no state across
    restarts). Rows whose key went back (a replay's repeated windows) or is missing are
    never picked."""
    k = np.asarray(keys, dtype=np.float64)
    valid = np.isfinite(k)
    forward = np.flatnonzero(valid & (k >= np.maximum.accumulate(np.where(valid, k, -np.inf))))
    if not len(forward):
        return list(range(len(keys)))[-target:]
    kk = k[forward]  # non-decreasing
    step = 2.0 ** math.floor(math.log2(max(kk[-1] - kk[0], 1.0) / target))
    while True:
        bucket = np.floor(kk / step)
        first = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
        if len(first) < target:
            return sorted({*forward[first].tolist(), len(keys) - 1})
        step *= 2


class TimeSeries:
    """The daemon's history writer. Called on the training thread only."""

    def __init__(
        self,
        run_dir: Path,
        *,
        status_every_s: float = STATUS_EVERY_S,
        status_rows: int = STATUS_ROWS,
        windows_rows: int = WINDOWS_ROWS,
        events_rows: int = EVENTS_ROWS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = run_dir / TIMESERIES_DIR
        self._status_every_s = status_every_s
        self._windows_rows = windows_rows
        self._clock = clock
        self._files: dict[str, BoundedJsonLines] = {}
        self._caps: dict[str, tuple[int, str | None]] = {STATUS_FILE: (status_rows, "t"), EVENTS_FILE: (events_rows, None)}
        self._previous: DaemonStatus | None = None  # snapshot of the previous turn
        self._run: float | None = None  # wall time of this process's first turn: tells runs apart
        self._last_row: tuple[float, int, dict[str, tuple[float, float]]] | None = None  # t, samples, histogram totals
        self._failing = False

    # ------------------------------------------------------------------ feeding
    def turn(self, status: DaemonStatus, latencies: Mapping[str, Histogram]) -> None:
        """After a loop turn: events since the previous turn, and a status row when one is
        due, or the gate changed (so FROZEN spans start where the transition is), or the
        snapshot is not ``running`` (the first and the last).
        ``latencies``: unlabelled histograms whose mean over the interval goes into the row
        as ``<name>_s`` (the daemon's freshness and join latency)."""
        now = self._clock()
        previous, self._previous = self._previous, status
        at = {"t": now, "samples": status.samples_trained, "ts_ms": status.watermark}
        if previous is None:
            self._run = now
            self._write(EVENTS_FILE, {**at, "kind": "start", "resumed_from": status.last_checkpoint})
        else:
            for event in _events_between(previous, status):
                self._write(EVENTS_FILE, {**at, **event})
        due = self._last_row is None or now - self._last_row[0] >= self._status_every_s
        gate_moved = previous is not None and previous.gate_transitions != status.gate_transitions
        if due or gate_moved or status.state != "running":
            totals = {name: _totals(histogram) for name, histogram in latencies.items()}
            self._write(STATUS_FILE, {**at, **self._status_row(status, now, totals)})

    def window(self, verdict: Verdict, *, samples: int, ts_ms: int | None) -> None:
        """A monitor closed a window (``samples`` trained and event time ``ts_ms`` then)."""
        metrics = {k: _finite_or_none(v) for k, v in verdict.metrics.items()
                   if k.partition("/")[0] in WINDOW_METRIC_KINDS}
        self._write(window_file(verdict.monitor), {
            "t": self._clock(), "samples": samples, "ts_ms": ts_ms, "window": verdict.window,
            "rows": verdict.sample_count, "judged": verdict.judged, "ok": verdict.ok, "alarm": verdict.alarm,
            "warming_up": verdict.warming_up, "reason": verdict.reason[:MAX_REASON_CHARS], "metrics": metrics})

    # ------------------------------------------------------------------ rows
    def _status_row(self, status: DaemonStatus, now: float, totals: dict[str, tuple[float, float]]) -> dict[str, Any]:
        rate = None
        means: dict[str, float | None] = {f"{name}_s": None for name in totals}
        if self._last_row is not None:
            t, samples, last = self._last_row
            if now > t and status.samples_trained >= samples:
                rate = (status.samples_trained - samples) / (now - t)
            for name, (total, count) in totals.items():
                last_total, last_count = last.get(name, (0.0, 0.0))
                if count > last_count:
                    means[f"{name}_s"] = (total - last_total) / (count - last_count)
        self._last_row = (now, status.samples_trained, totals)
        counters = status.counters
        return {
            "run": self._run,
            "steps": status.steps,
            "samples_per_s": rate,
            "events": counters.get("messages", 0),
            "dlq": sum(v for k, v in counters.items() if k.startswith("dlq.")),
            "lag": sum(max(0, v) for v in status.lag.values()),
            "loss": {k: _finite_or_none(v) for k, v in status.losses.items()},
            **means,
            "gate": status.gate.get("state"),
            "checkpoint": status.last_checkpoint,
            "version": status.current_version.name if status.current_version else None,
        }

    # ------------------------------------------------------------------ files
    def _write(self, name: str, row: Mapping[str, Any]) -> None:
        try:
            file = self._files.get(name)
            if file is None:
                self.root.mkdir(parents=True, exist_ok=True)
                rows, thin_by = self._caps.get(name, (self._windows_rows, "window"))
                file = self._files[name] = BoundedJsonLines(self.root / name, rows, thin_by=thin_by)
            file.append(row)
        except OSError as exc:
            if not self._failing:  # once per streak of failures, not once per row
                log.warning("run history not written (%s): the report will have a gap; training goes on", exc)
            self._failing = True
            return
        self._failing = False


def _events_between(before: DaemonStatus, after: DaemonStatus) -> list[dict[str, Any]]:
    """What changed from one snapshot to the next (several changes of one kind inside one
    loop turn show as the last one, with a count for checkpoints)."""
    events: list[dict[str, Any]] = []
    written = after.checkpoints_written - before.checkpoints_written
    if written > 0:
        events.append({"kind": "checkpoint", "name": after.last_checkpoint, "count": written})
    failed = after.checkpoint_failures - before.checkpoint_failures
    if failed > 0:
        events.append({"kind": "checkpoint_failed", "count": failed})
    if after.current_version is not None and after.current_version != before.current_version:
        events.append({"kind": "version", "name": after.current_version.name, "number": after.current_version.number})
    transition = after.gate.get("last_transition")
    if transition and after.gate_transitions != before.gate_transitions:
        events.append({"kind": "gate", "from": transition["from"], "to": transition["to"],
                       "reason": str(transition["reason"])[:MAX_REASON_CHARS], "monitors": transition["monitors"],
                       "manual": transition["manual"], "seq": transition["seq"]})
    return events


def _totals(histogram: Histogram) -> tuple[float, float]:
    """(sum, count) of an unlabelled histogram, through its public ``collect()``."""
    values = {s.name.rpartition("_")[2]: s.value for metric in histogram.collect() for s in metric.samples}
    return float(values.get("sum", 0.0)), float(values.get("count", 0.0))


def _finite_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
