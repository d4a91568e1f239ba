"""Prometheus exposition for the daemon, on a private registry bound to loopback.

Components keep plain counters (they must not import prometheus). After every loop turn
the daemon hands the points of its status snapshot to :meth:`DaemonMetrics.update_snapshot`;
scrapes read the latest snapshot through :class:`SnapshotCollector`. This keeps the
training loop free of metric calls and makes the exposition consistent within one
scrape. Latency distributions (freshness, join latency, step and checkpoint duration)
are real histograms observed as they happen.

Names follow ``streamtrain_<noun>_<unit>`` with ``_total`` for counters.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

Kind = Literal["counter", "gauge"]


@dataclass(frozen=True)
class Point:
    """One sample of one metric. ``name`` excludes the ``_total`` suffix for counters."""

    name: str
    kind: Kind
    help: str
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


class SnapshotCollector(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._points: list[Point] = []

    def update(self, points: Iterable[Point]) -> None:
        snapshot = list(points)
        with self._lock:
            self._points = snapshot

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            points = list(self._points)
        families: dict[str, Metric] = {}
        for p in points:
            family = families.get(p.name)
            if family is None:
                cls = CounterMetricFamily if p.kind == "counter" else GaugeMetricFamily
                family = families[p.name] = cls(p.name, p.help, labels=sorted(p.labels))
            family.add_metric([p.labels[k] for k in sorted(p.labels)], p.value)
        yield from families.values()


_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._snapshot = SnapshotCollector()
        self.registry.register(self._snapshot)
        self.freshness = Histogram(
            "streamtrain_freshness_seconds", "Wall time from an event's Kafka timestamp to the model having trained on it.",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.join_latency = Histogram(
            "streamtrain_join_latency_seconds", "Event time from an exposure to its sample's emission (label window wait).",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.step_duration = Histogram(
            "streamtrain_train_step_seconds", "Wall time of one training step (forward, backward, updates).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=self.registry)
        self.checkpoint_duration = Histogram(
            "streamtrain_checkpoint_duration_seconds", "Wall time to write one checkpoint.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self._server: object | None = None

    def update_snapshot(self, points: Iterable[Point]) -> None:
        self._snapshot.update(points)

    def serve(self, host: str, port: int) -> int:
        """Expose ``/metrics`` on ``host:port`` (port 0 = free port); returns the port."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server.server_close()  # type: ignore[attr-defined]
            self._server = None
