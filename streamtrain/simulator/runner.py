"""Drive an :class:`EventStream` into sinks at a configured pace."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import orjson

from consumers.markers import produce_end_of_input

from streamtrain.simulator.config import SimulatorConfig
from streamtrain.simulator.stream import EventStream, SimEvent


class EventSink(Protocol):
    def send(self, event: SimEvent) -> None: ...

    def end_of_input(self) -> None:
        """The stream is complete (a finite ``exposures`` run that was not stopped)."""

    def close(self) -> None: ...


@dataclass
class SimulationStats:
    events: int = 0
    valid_events: int = 0
    bad_events: int = 0
    exposures: int = 0
    clicks: int = 0
    converts: int = 0
    wall_s: float = 0.0

    def summary(self) -> dict[str, float]:
        return {
            "events": self.events, "valid_events": self.valid_events, "bad_events": self.bad_events,
            "exposures": self.exposures, "clicks": self.clicks, "converts": self.converts,
            "ctr": self.clicks / self.exposures if self.exposures else 0.0,
            "cvr": self.converts / self.clicks if self.clicks else 0.0,
            "wall_s": round(self.wall_s, 3),
            "events_per_s": round(self.events / self.wall_s, 1) if self.wall_s else 0.0,
        }


class KafkaSink:
    """Produce to a topic, key = user id (one user's events share a partition)."""

    def __init__(self, bootstrap_servers: str, topic: str, client_overrides: dict | None = None,
                 mark_end: bool = False) -> None:
        from confluent_kafka import Producer

        self.topic = topic
        self.mark_end = mark_end  # end a complete stream with an end-of-input marker per partition
        self._producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 5,
                                   "enable.idempotence": False, **(client_overrides or {})})

    def send(self, event: SimEvent) -> None:
        while True:
            try:
                self._producer.produce(self.topic, key=event.key, value=event.value, timestamp=event.arrival_ts)
                break
            except BufferError:  # local queue full: let librdkafka drain it
                self._producer.poll(0.05)
        self._producer.poll(0)

    def end_of_input(self) -> None:
        """With ``mark_end``: a marker into every partition (after every event: one producer
        keeps per-partition order), so a daemon reading the topic trains all and exits."""
        if self.mark_end:
            partitions = self._producer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
            produce_end_of_input(self._producer, self.topic, sorted(partitions))

    def close(self) -> None:
        remaining = self._producer.flush(30)
        if remaining:
            raise RuntimeError(f"{remaining} simulator messages were not delivered to {self.topic}")


class JsonlSink:
    """One line per message (``{"key", "value"}``; value as text) for offline runs and tests."""

    def __init__(self, path: Path) -> None:
        self._file: IO[bytes] = open(path, "wb")

    def send(self, event: SimEvent) -> None:
        self._file.write(orjson.dumps({"key": event.key.decode(), "value": event.value.decode(errors="replace"),
                                       "valid": event.valid}) + b"\n")

    def end_of_input(self) -> None:
        return None  # a file ends where it ends

    def close(self) -> None:
        self._file.close()


def run_simulation(
    config: SimulatorConfig,
    sink: EventSink,
    *,
    truth_sink: Callable[[dict], None] | None = None,
    stop: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> SimulationStats:
    """Produce the configured stream; returns counts. Pacing: at most ``rate`` events per
    wall second and/or event time advancing ``time_scale`` times faster than wall time."""
    stats = SimulationStats()
    stream = EventStream(config)
    start_wall = clock()
    try:
        for event in stream:
            if stop is not None and stop.is_set():
                break
            _pace(config, stats.events, event.arrival_ts - config.start_ts_ms, start_wall, clock, sleep)
            sink.send(event)
            stats.events += 1
            if not event.valid:
                stats.bad_events += 1
                continue
            stats.valid_events += 1
            if event.truth is not None:
                stats.exposures += 1
                stats.clicks += event.truth["click"]
                stats.converts += event.truth["convert"]
                if truth_sink is not None:
                    truth_sink(event.truth)
        else:  # the stream ran out (finite exposures), nobody stopped it
            sink.end_of_input()
    finally:
        sink.close()
        stats.wall_s = clock() - start_wall
    return stats


def _pace(config: SimulatorConfig, sent: int, event_elapsed_ms: int, start: float, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
    due = 0.0
    if config.rate:
        due = max(due, sent / config.rate)
    if config.time_scale:
        due = max(due, event_elapsed_ms / 1000.0 / config.time_scale)
    wait = due - (clock() - start)
    if wait > 0:
        sleep(wait)
