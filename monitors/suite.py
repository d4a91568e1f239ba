"""The monitors, the gate and the sinks wired together: what the trainer daemon talks to.

Per training step (prequential: score the batch, then train on it) the daemon calls
:meth:`MonitorSuite.update` with the batch's scores, labels and features. Monitors close
windows by sample count; their verdicts go, in sample order, to the sinks and the gate.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from numpy.typing import ArrayLike

from .alerts import LogSink, Sink, SinkGroup
from .auc import AucMonitor
from .base import IncompatibleStateError, WindowedMonitor
from .batch import ScoredBatch
from .config import MonitorsConfig
from .feature_drift import FeatureDriftMonitor
from .gate import Gate
from .label_ratio import LabelRatioMonitor
from .verdict import Verdict

SUITE_FORMAT_VERSION = 1

logger = logging.getLogger("monitors.suite")


class MonitorSuite:
    """All enabled monitors + the gate + the sinks, with one state and one status.

    ``sparse_features`` / ``dense_features`` name the columns of the ``sparse`` (B, S) and
    ``dense`` (B, D) arrays, in order. A :class:`LogSink` is always attached (every
    transition is logged); ``sinks`` adds more (see :func:`monitors.alerts.build_sinks`).

    Thread-safe: :meth:`update` runs on the training thread while the control endpoint
    may call :meth:`rebaseline`, :meth:`status` or the gate's ``freeze`` / ``unfreeze``.
    """

    def __init__(
        self,
        config: MonitorsConfig,
        sparse_features: Sequence[str],
        dense_features: Sequence[str],
        *,
        sinks: Sequence[Sink] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.sparse_features = tuple(sparse_features)
        self.dense_features = tuple(dense_features)
        self.monitors: dict[str, WindowedMonitor] = {m.name: m for m in self._build_monitors()}
        self.sinks = SinkGroup([LogSink(), *sinks])
        self.gate = Gate(config.gate, on_transition=self.sinks.on_transition, clock=clock)
        self._samples = 0
        self._lock = threading.Lock()  # monitors are not thread-safe on their own

    def _build_monitors(self) -> list[WindowedMonitor]:
        cfg = self.config
        monitors: list[WindowedMonitor] = []
        if cfg.label_ratio.enabled:
            monitors.append(LabelRatioMonitor(cfg.label_ratio))
        watched = set(self.sparse_features + self.dense_features) - set(cfg.feature_drift.exclude)
        if cfg.feature_drift.enabled and watched:
            monitors.append(FeatureDriftMonitor(cfg.feature_drift, self.sparse_features, self.dense_features))
        if cfg.auc.enabled:
            monitors.append(AucMonitor(cfg.auc))
        return monitors

    @property
    def samples(self) -> int:
        return self._samples

    def update(
        self,
        scores_ctr: ArrayLike,
        scores_ctcvr: ArrayLike,
        click: ArrayLike,
        convert: ArrayLike,
        sparse: ArrayLike,
        dense: ArrayLike,
    ) -> list[Verdict]:
        """Feed one batch (scores made before training on it); return the verdicts of the
        windows it closed. Shapes: scores/labels (B,), sparse (B, S), dense (B, D)."""
        batch = ScoredBatch.from_arrays(scores_ctr, scores_ctcvr, click, convert, sparse, dense)
        widths = (batch.sparse.shape[1], batch.dense.shape[1])
        if widths != (len(self.sparse_features), len(self.dense_features)):
            raise ValueError(
                f"batch has {widths[0]} sparse / {widths[1]} dense columns, "
                f"declared {len(self.sparse_features)} / {len(self.dense_features)}"
            )
        with self._lock:
            verdicts = [v for monitor in self.monitors.values() for v in monitor.update(batch)]
            verdicts.sort(key=lambda v: v.sample_count)  # stable: same-count verdicts keep monitor order
            for verdict in verdicts:
                self.sinks.on_verdict(verdict)
                self.gate.observe(verdict)
            self._samples += len(batch)
        return verdicts

    def rebaseline(self, names: Iterable[str] | None = None) -> None:
        """Make the named monitors (default: all) learn a new reference and drop their alarms.

        For an operator who judged a shift real and permanent; the gate sees the cleared
        alarms with each monitor's next verdict."""
        chosen = list(self.monitors if names is None else names)
        unknown = sorted(set(chosen) - set(self.monitors))
        if unknown:
            raise ValueError(f"no such monitor(s) {unknown}; running: {sorted(self.monitors)}")
        with self._lock:
            for name in chosen:
                self.monitors[name].rebaseline()

    def status(self) -> dict[str, Any]:
        """JSON-able summary for ``GET /status``."""
        with self._lock:
            return {
                "samples": self._samples,
                "gate": self.gate.status(),
                "monitors": {
                    name: {
                        "alarm": m.alarm,
                        "warming_up": m.warming_up,
                        "samples": m.samples,
                        "last_verdict": None if m.last_verdict is None else m.last_verdict.to_dict(),
                    }
                    for name, m in self.monitors.items()
                },
            }

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "format_version": SUITE_FORMAT_VERSION,
                "samples": self._samples,
                "monitors": {name: m.state_dict() for name, m in self.monitors.items()},
                "gate": self.gate.state_dict(),
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. A monitor missing from it, or saved with another
        window/bucket layout (the config changed), starts afresh with a warning rather than
        keeping the daemon from starting."""
        if state.get("format_version") != SUITE_FORMAT_VERSION:
            raise ValueError(f"suite state format {state.get('format_version')!r}, expected {SUITE_FORMAT_VERSION}")
        saved = state["monitors"]
        with self._lock:
            for name, monitor in self.monitors.items():
                if name not in saved:
                    logger.warning("monitor %s has no saved state: it learns a new reference", name)
                    continue
                try:
                    monitor.load_state_dict(saved[name])
                except IncompatibleStateError as exc:
                    logger.warning("%s: it learns a new reference", exc)
            self.gate.load_state_dict(state["gate"])
            self._samples = int(state["samples"])

    def close(self, timeout: float = 5.0) -> bool:
        """Flush the sinks (webhook deliveries) within ``timeout`` seconds."""
        return self.sinks.close(timeout)
