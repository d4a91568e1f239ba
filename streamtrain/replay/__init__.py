"""Replay a timestamped interaction log (MovieLens, CSV, Parquet) as events of the contract.

``read_*`` (readers.py) -> :func:`build_events` (events.py) -> :func:`replay` into a sink
(Kafka or a JSON-lines file), paced by event time, ended by end-of-input markers so a
daemon trains every sample of it and exits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from streamtrain.replay.events import Event, ReplayRules, build_events, week_shift
from streamtrain.replay.readers import Columns, Interactions, ReplayError, read_csv, read_movielens, read_parquet
from streamtrain.simulator.runner import EventSink


@dataclass
class ReplaySummary:
    events: int = 0
    exposures: int = 0
    clicks: int = 0
    converts: int = 0
    first_ts: int | None = None  # ms, after the shift
    last_ts: int | None = None
    stopped: bool = False  # interrupted before the end (no end-of-input markers then)
    wall_s: float = 0.0


def replay(events: Iterable[Event], sink: EventSink, *, speed: float = 0.0, stop: threading.Event | None = None,
           clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> ReplaySummary:
    """Send ``events`` in order; ``speed`` = event seconds per wall second (0: as fast as
    possible). A complete replay ends with ``sink.end_of_input()``; the sink is closed."""
    summary = ReplaySummary()
    started = clock()
    try:
        for event in events:
            if stop is not None and stop.is_set():
                summary.stopped = True
                break
            if summary.first_ts is None:
                summary.first_ts = event.arrival_ts
            if speed > 0:
                due = (event.arrival_ts - summary.first_ts) / 1000.0 / speed - (clock() - started)
                if due > 0:
                    sleep(due)
            sink.send(event)
            summary.events += 1
            summary.last_ts = event.arrival_ts
            if event.kind == "exposure":
                summary.exposures += 1
            elif event.kind == "click":
                summary.clicks += 1
            else:
                summary.converts += 1
        else:
            sink.end_of_input()
    finally:
        sink.close()
        summary.wall_s = clock() - started
    return summary


__all__ = ["Columns", "Event", "Interactions", "ReplayError", "ReplayRules", "ReplaySummary", "build_events",
           "read_csv", "read_movielens", "read_parquet", "replay", "week_shift"]
