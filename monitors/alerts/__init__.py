"""Alert sinks: where verdicts and gate transitions go (logs, webhooks, metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from ..config import AlertConfig
from .base import Sink, SinkGroup
from .log import LogSink
from .metrics import GAUGES, GaugeCallback, MetricsSink
from .webhook import ALERT_NAME, WebhookSink, post_json, rfc3339


def build_sinks(config: AlertConfig, registry: CollectorRegistry | None = None) -> list[Sink]:
    """The sinks ``config`` asks for: a :class:`WebhookSink` when urls are set, a
    :class:`MetricsSink` when a registry is given. (:class:`~monitors.suite.MonitorSuite`
    always adds a :class:`LogSink` itself.)"""
    sinks: list[Sink] = []
    if config.webhook_urls:
        sinks.append(WebhookSink(config))
    if registry is not None:
        sinks.append(MetricsSink(registry))
    return sinks


__all__ = [
    "ALERT_NAME",
    "GAUGES",
    "GaugeCallback",
    "LogSink",
    "MetricsSink",
    "Sink",
    "SinkGroup",
    "WebhookSink",
    "build_sinks",
    "post_json",
    "rfc3339",
]
