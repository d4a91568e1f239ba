"""Metrics hook: verdicts and transitions as gauge updates, for Prometheus or any callback.

No global registry is touched: pass the daemon's ``CollectorRegistry`` (gauges are
registered in it) or a ``callback(name, labels, value)`` that sets gauges however the
caller likes.
"""

from __future__ import annotations

from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, Gauge

from ..gate import GateState, Transition
from ..verdict import Verdict

GaugeCallback = Callable[[str, Mapping[str, str], float], None]

# name -> (help, label names): the complete set of series this sink writes.
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "streamtrain_monitor_value": (
        "Last window metric of a monitor (metric e.g. psi, auc, rate; subject e.g. feature or head)",
        ("monitor", "metric", "subject"),
    ),
    "streamtrain_monitor_alarm": ("1 while the monitor is in alarm", ("monitor",)),
    "streamtrain_monitor_window_ok": ("1 if the monitor's last window was healthy", ("monitor",)),
    "streamtrain_monitor_warming_up": ("1 while the monitor learns its reference", ("monitor",)),
    "streamtrain_monitor_samples": ("Samples seen by the monitor at its last window", ("monitor",)),
    "streamtrain_gate_frozen": ("1 while the publication gate is FROZEN", ()),
    "streamtrain_gate_transition_samples": ("Sample count at the last gate transition", ()),
}


class MetricsSink:
    def __init__(self, registry: CollectorRegistry | None = None, *, callback: GaugeCallback | None = None) -> None:
        if registry is not None and callback is None:
            self._set = _registry_setter(registry)
        elif callback is not None and registry is None:
            self._set = callback
        else:
            raise ValueError("MetricsSink needs exactly one of registry= or callback=")

    def on_verdict(self, verdict: Verdict) -> None:
        monitor = {"monitor": verdict.monitor}
        self._set("streamtrain_monitor_alarm", monitor, float(verdict.alarm))
        self._set("streamtrain_monitor_window_ok", monitor, float(verdict.ok))
        self._set("streamtrain_monitor_warming_up", monitor, float(verdict.warming_up))
        self._set("streamtrain_monitor_samples", monitor, float(verdict.sample_count))
        for key, value in verdict.metrics.items():
            metric, _, subject = key.partition("/")
            self._set("streamtrain_monitor_value", {**monitor, "metric": metric, "subject": subject}, value)

    def on_transition(self, transition: Transition) -> None:
        self._set("streamtrain_gate_frozen", {}, float(transition.to_state is GateState.FROZEN))
        self._set("streamtrain_gate_transition_samples", {}, float(transition.sample_count))

    def close(self, timeout: float) -> bool:
        return True


def _registry_setter(registry: CollectorRegistry) -> GaugeCallback:
    """Register :data:`GAUGES` in ``registry``; return a callback that sets them."""
    gauges = {name: Gauge(name, doc, labels, registry=registry) for name, (doc, labels) in GAUGES.items()}

    def set_gauge(name: str, labels: Mapping[str, str], value: float) -> None:
        gauge = gauges[name]
        (gauge.labels(**labels) if labels else gauge).set(value)

    return set_gauge
