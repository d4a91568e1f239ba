"""Label-ratio monitor: window CTR and CVR against an EWMA baseline.

CTR = clicks / samples, CVR = conversions / clicks (post-click, as in ESMM). A rate is
bad when it deviates from its baseline by more than ``max_relative_deviation`` and/or by
more than ``z_threshold`` binomial standard errors (``rule`` says which combination).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .base import Assessment, WindowedMonitor
from .batch import ScoredBatch
from .config import LabelRatioMonitorConfig

_RATES = ("ctr", "cvr")


class LabelRatioMonitor(WindowedMonitor):
    def __init__(self, config: LabelRatioMonitorConfig, name: str = "label_ratio") -> None:
        super().__init__(name, config)
        self.config: LabelRatioMonitorConfig = config
        self._reset_window()
        self._reset_reference()

    def _reset_window(self) -> None:
        self._counts = np.zeros(3, dtype=np.int64)  # samples, clicks, conversions in the open window

    def _reset_reference(self) -> None:
        self._ref_counts = np.zeros(3, dtype=np.int64)  # pooled warm-up counts
        self._baseline = np.full(2, math.nan)  # (ctr, cvr); NaN: not judged (too few reference events)

    def _accumulate(self, chunk: ScoredBatch, learning: bool) -> None:
        self._counts += np.array([len(chunk), np.count_nonzero(chunk.click), np.count_nonzero(chunk.ctcvr)])

    def _close(self, learning: bool, reference_complete: bool) -> Assessment:
        samples, clicks, conversions = (int(c) for c in self._counts)
        rates = (clicks / samples, conversions / clicks if clicks else math.nan)
        trials = (samples, clicks)
        metrics = {f"rate/{name}": rate for name, rate in zip(_RATES, rates)}
        metrics |= {"count/samples": samples, "count/clicks": clicks, "count/conversions": conversions}
        if learning:
            self._ref_counts += self._counts
            if reference_complete:
                self._learn_baseline()
            return Assessment(metrics)
        problems = []
        for i, name in enumerate(_RATES):
            base = self._baseline[i]
            rel, z = _deviation(rates[i], base, trials[i])
            metrics |= {f"baseline/{name}": base, f"relative_deviation/{name}": rel, f"z/{name}": z}
            if self._is_bad(rel, z):
                problems.append(
                    f"{name.upper()} {rates[i]:.4f} vs baseline {base:.4f} ({rel:+.0%}, z={z:+.1f}, n={trials[i]})"
                )
        judged = not np.isnan(self._baseline).all()
        return Assessment(metrics, problems, judged=judged, note="" if judged else "too few reference events")

    def _learn_baseline(self) -> None:
        samples, clicks, conversions = (int(c) for c in self._ref_counts)
        events = (clicks, conversions)
        trials = (samples, clicks)
        for i in range(2):
            ok = events[i] >= self.config.min_events and trials[i] > events[i]
            self._baseline[i] = events[i] / trials[i] if ok else math.nan

    def _is_bad(self, rel: float, z: float) -> bool:
        tests = []
        if self.config.max_relative_deviation is not None:
            tests.append(abs(rel) > self.config.max_relative_deviation)
        if self.config.z_threshold is not None:
            tests.append(abs(z) > self.config.z_threshold)
        combine = all if self.config.rule == "all" else any
        return combine(tests)  # NaN comparisons are False: an unjudged rate is never bad

    def _adapt(self, metrics: Mapping[str, float]) -> None:
        alpha = self.config.baseline_alpha
        for i, name in enumerate(_RATES):
            rate = metrics[f"rate/{name}"]
            if not (math.isnan(rate) or math.isnan(self._baseline[i])):
                self._baseline[i] = (1 - alpha) * self._baseline[i] + alpha * rate

    def _state(self) -> dict[str, Any]:
        return {"counts": self._counts.copy(), "ref_counts": self._ref_counts.copy(), "baseline": self._baseline.copy()}

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self._counts = np.array(state["counts"], dtype=np.int64)
        self._ref_counts = np.array(state["ref_counts"], dtype=np.int64)
        self._baseline = np.array(state["baseline"], dtype=np.float64)


def _deviation(rate: float, base: float, trials: int) -> tuple[float, float]:
    """Relative deviation and binomial z-score of ``rate`` over ``trials`` against ``base``."""
    if math.isnan(rate) or math.isnan(base):
        return math.nan, math.nan
    return rate / base - 1.0, (rate - base) / math.sqrt(base * (1.0 - base) / trials)
