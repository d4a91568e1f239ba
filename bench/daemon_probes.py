"""Timing probes of a running ``Daemon``.

:func:`clock_hooks` feeds the step and poll clocks through the daemon's public hooks
(``on_trained`` right after each step returns, ``on_polled`` after each poll, with their
durations). :func:`wrap_method` is the one piece of code that replaces anything on a
daemon's parts: :class:`CallTimer` uses it to split the rest of the loop's time
(checkpoints, releases), which no hook reports. The recorders (:class:`StepClock`,
:class:`PollClock`, :class:`CallTimer`) know nothing about how they are fed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from streamtrain.runtime import DaemonHooks
from streamtrain.trainer import StepResult

Batch = dict[str, np.ndarray]


def wrap_method(obj: Any, name: str, record: Callable[[float, float, tuple[Any, ...], Any], None]) -> None:
    """Replace ``obj.<name>`` on this instance (not its class) by a wrapper that calls the
    original and then ``record(start, end, args, result)``: the caller keeps calling it as
    usual, so what is timed is exactly what the daemon runs."""
    inner = getattr(obj, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = inner(*args, **kwargs)
        record(start, time.perf_counter(), args, result)
        return result

    setattr(obj, name, wrapper)


class StepClock:
    """Every training step: its end time, its duration and the (non-correction) sample ids and
    partitions it trained; with ``keep_batches`` also a copy of every batch (the throughput
    baseline replays them). Fed from the daemon's thread, read from others: locked."""

    def __init__(self, *, keep_batches: bool = False) -> None:
        self.keep_batches = keep_batches
        self.lock = threading.Lock()
        self.ends: list[float] = []
        self.durations: list[float] = []
        self.ids: list[np.ndarray] = []
        self.partitions: list[np.ndarray] = []
        self.batches: list[Batch] = []

    def record(self, start: float, end: float, batch: Batch) -> None:
        first = ~batch["is_correction"]
        with self.lock:
            self.ends.append(end)
            self.durations.append(end - start)
            self.ids.append(batch["sample_id"][first].copy())
            self.partitions.append(batch["partition"][first].copy())
            if self.keep_batches:
                self.batches.append({k: np.array(v, copy=True) for k, v in batch.items()})

    def partition_of(self) -> dict[int, int]:
        """sample id -> the Kafka partition its exposure was read from."""
        with self.lock:
            return {sid: p for ids, parts in zip(self.ids, self.partitions)
                    for sid, p in zip(ids.tolist(), parts.tolist())}

    def trained_at(self) -> dict[int, float]:
        """sample id -> end time of the step that first trained it."""
        with self.lock:
            out: dict[int, float] = {}
            for end, ids in zip(self.ends, self.ids):
                for sid in ids.tolist():
                    out.setdefault(sid, end)
            return out


class PollClock:
    """When the joiner emitted each sample: sample id -> end of the ``pipeline.poll`` (consume
    -> decode -> join) that returned it, first emission only (corrections left out); and its
    place in the sample sequence (``order``), which the trainer consumes first in, first out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.emitted: dict[int, float] = {}
        self.order: dict[int, int] = {}

    def record(self, end: float, batches: list[Batch]) -> None:
        with self.lock:
            for b in batches:
                for sid in b["sample_id"][~b["is_correction"]].tolist():
                    self.emitted.setdefault(sid, end)
                    self.order.setdefault(sid, len(self.order))


def clock_hooks(steps: StepClock, polls: PollClock | None = None, poll_spans: list[tuple[float, float]] | None = None) -> DaemonHooks:
    """Daemon hooks feeding ``steps`` with every step (its batch, start and end), ``polls``
    with every poll's emitted samples and ``poll_spans`` with every poll's (start, end)."""

    def on_trained(batch: Batch, result: StepResult) -> None:
        end = time.perf_counter()
        steps.record(end - result.seconds, end, batch)

    def on_polled(batches: list[Batch], seconds: float) -> None:
        end = time.perf_counter()
        if polls is not None:
            polls.record(end, batches)
        if poll_spans is not None:
            poll_spans.append((end - seconds, end))

    return DaemonHooks(on_polled=on_polled, on_trained=on_trained)


class CallTimer:
    """The (start, end) of every call of ``obj.<name>``."""

    def __init__(self, obj: Any, name: str) -> None:
        self.spans: list[tuple[float, float]] = []
        wrap_method(obj, name, lambda start, end, _args, _result: self.spans.append((start, end)))

    def within(self, lo: float, hi: float) -> float:
        """Seconds spent in calls, clipped to [lo, hi]."""
        return seconds_within(self.spans, lo, hi)


def seconds_within(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Total length of ``spans`` clipped to [lo, hi]."""
    return sum(max(0.0, min(end, hi) - max(start, lo)) for start, end in spans)
