"""Alert sinks: where verdicts and gate transitions go (logs, webhooks).

Metrics are not a sink: the daemon exports monitor and gate state from its status
snapshot (one path, one name per metric; see ``streamtrain/runtime/metric_points.py``).
"""

from __future__ import annotations

from ..config import AlertConfig
from .base import Sink, SinkGroup
from .log import LogSink
from .webhook import ALERT_NAME, WebhookSink, post_json, rfc3339


def build_sinks(config: AlertConfig) -> list[Sink]:
    """The sinks ``config`` asks for: a :class:`WebhookSink` when urls are set.
    (:class:`~monitors.suite.MonitorSuite` always adds a :class:`LogSink` itself.)"""
    sinks: list[Sink] = []
    if config.webhook_urls:
        sinks.append(WebhookSink(config))
    return sinks


__all__ = [
    "ALERT_NAME",
    "LogSink",
    "Sink",
    "SinkGroup",
    "WebhookSink",
    "build_sinks",
    "post_json",
    "rfc3339",
]
