"""Drift monitors that gate model publication, and alerting.

A leaf package: it works on plain numpy arrays of scores, labels and features and
imports nothing from ``streamtrain``, ``consumers`` or ``checkpoints``.

* :class:`MonitorSuite` - the entry point: per-batch ``update(...)``, ``gate``, ``status()``,
  ``state_dict()`` / ``load_state_dict()``.
* Monitors: :class:`LabelRatioMonitor`, :class:`FeatureDriftMonitor`, :class:`AucMonitor`,
  each producing one :class:`Verdict` per window of samples.
* :class:`Gate` (OPEN / FROZEN) and its :class:`Transition` records.
* Sinks (:mod:`monitors.alerts`): :class:`LogSink`, :class:`WebhookSink`.
"""

from .alerts import LogSink, Sink, SinkGroup, WebhookSink, build_sinks
from .auc import AucMonitor
from .base import IncompatibleStateError, WindowedMonitor
from .batch import ScoredBatch
from .config import (
    AlertConfig,
    AucMonitorConfig,
    FeatureDriftMonitorConfig,
    GateConfig,
    LabelRatioMonitorConfig,
    MonitorsConfig,
)
from .feature_drift import FeatureDriftMonitor
from .gate import Gate, GateState, Transition
from .label_ratio import LabelRatioMonitor
from .suite import MonitorSuite
from .verdict import Hysteresis, Verdict

__all__ = [
    "AlertConfig",
    "AucMonitor",
    "AucMonitorConfig",
    "FeatureDriftMonitor",
    "FeatureDriftMonitorConfig",
    "Gate",
    "GateConfig",
    "GateState",
    "Hysteresis",
    "IncompatibleStateError",
    "LabelRatioMonitor",
    "LabelRatioMonitorConfig",
    "LogSink",
    "MonitorSuite",
    "MonitorsConfig",
    "ScoredBatch",
    "Sink",
    "SinkGroup",
    "Transition",
    "Verdict",
    "WebhookSink",
    "WindowedMonitor",
    "build_sinks",
]
