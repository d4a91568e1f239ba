"""Ranking-quality monitor: exact window AUC, log-loss and calibration per head.

Heads: ``ctr`` (score P(click) vs click) and ``ctcvr`` (score P(click & convert) vs
click & convert). The scores are prequential (made before training on the batch), so
this is honest held-out quality. A judged head is bad when its AUC is under the floor,
dropped from its baseline (EWMA of good windows) by more than ``max(max_drop, drop_z * SE)``,
or its calibration (mean prediction / observed rate) leaves ``calibration_range``.
Non-finite scores are always bad: the model is broken, whatever the ranking says.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

from .base import Assessment, WindowedMonitor
from .batch import ScoredBatch
from .config import AucMonitorConfig
from .stats import auc_standard_error, log_loss, window_auc

HEADS = ("ctr", "ctcvr")


class AucMonitor(WindowedMonitor):
    def __init__(self, config: AucMonitorConfig, name: str = "auc") -> None:
        super().__init__(name, config)
        self.config: AucMonitorConfig = config
        self._scores = np.zeros((2, config.window), dtype=np.float64)  # (head, W) window buffer
        self._labels = np.zeros((2, config.window), dtype=bool)
        self._reset_window()
        self._reset_reference()

    def _reset_window(self) -> None:
        """The buffers are overwritten in place; only the fill level (owned by the base) matters."""

    def _reset_reference(self) -> None:
        self._ref_sums = np.zeros((2, 2))  # (head, [sum of warm-up AUCs, judged warm-up windows])
        self._baseline = np.full(2, math.nan)  # per head; NaN until a judged window sets it

    def _accumulate(self, chunk: ScoredBatch, learning: bool) -> None:
        rows = slice(self._filled, self._filled + len(chunk))
        self._scores[0, rows] = chunk.scores_ctr
        self._scores[1, rows] = chunk.scores_ctcvr
        self._labels[0, rows] = chunk.click
        self._labels[1, rows] = chunk.ctcvr

    def _close(self, learning: bool, reference_complete: bool) -> Assessment:
        metrics: dict[str, float] = {}
        problems: list[str] = []
        judged = False
        for h, head in enumerate(HEADS):
            stats = _head_stats(self._scores[h], self._labels[h])
            metrics |= {f"{key}/{head}": value for key, value in stats.items()}
            metrics[f"auc_baseline/{head}"] = self._baseline[h]
            head_judged = min(stats["positives"], stats["negatives"]) >= self.config.min_positives
            if learning:
                if head_judged:
                    self._ref_sums[h] += (stats["auc"], 1.0)
                if reference_complete and self._ref_sums[h, 1] > 0:
                    self._baseline[h] = self._ref_sums[h, 0] / self._ref_sums[h, 1]
                continue
            if stats["nonfinite"] > 0:
                problems.append(f"{head}: {stats['nonfinite']:.0f} non-finite scores")
            if head_judged:
                judged = True
                problems += self._judge(head, stats, self._baseline[h])
        return Assessment(metrics, problems, judged=judged, note="" if judged else "too few positives to judge")

    def _judge(self, head: str, stats: Mapping[str, float], baseline: float) -> list[str]:
        cfg = self.config
        auc = stats["auc"]
        problems = []
        if auc < cfg.min_auc:
            problems.append(f"{head} AUC {auc:.3f} < floor {cfg.min_auc:.3f}")
        se = auc_standard_error(auc, int(stats["positives"]), int(stats["negatives"]))
        tolerance = max(cfg.max_drop, cfg.drop_z * se)
        if baseline - auc > tolerance:
            problems.append(
                f"{head} AUC {auc:.3f} dropped {baseline - auc:.3f} from baseline {baseline:.3f} (> {tolerance:.3f})"
            )
        if cfg.calibration_range is not None:
            low, high = cfg.calibration_range
            calibration = stats["calibration"]
            if not low <= calibration <= high:
                problems.append(f"{head} calibration {calibration:.2f} outside [{low}, {high}]")
        return problems

    def _adapt(self, metrics: Mapping[str, float]) -> None:
        alpha = self.config.baseline_alpha
        for h, head in enumerate(HEADS):
            auc = metrics[f"auc/{head}"]
            if min(metrics[f"positives/{head}"], metrics[f"negatives/{head}"]) < self.config.min_positives:
                continue
            base = self._baseline[h]
            self._baseline[h] = auc if math.isnan(base) else (1 - alpha) * base + alpha * auc

    def _state(self) -> dict[str, Any]:
        return {
            "scores": self._scores[:, : self._filled].copy(),
            "labels": self._labels[:, : self._filled].copy(),
            "ref_sums": self._ref_sums.copy(),
            "baseline": self._baseline.copy(),
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        filled = np.asarray(state["scores"]).shape[1]
        self._scores[:, :filled] = state["scores"]
        self._labels[:, :filled] = state["labels"]
        self._ref_sums = np.array(state["ref_sums"], dtype=np.float64)
        self._baseline = np.array(state["baseline"], dtype=np.float64)


def _head_stats(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """AUC, log-loss, calibration and counts of one head over one window (finite scores only)."""
    finite = np.isfinite(scores)
    s, y = scores[finite], labels[finite]
    positives = int(np.count_nonzero(y))
    observed = positives / y.shape[0] if y.shape[0] else math.nan
    return {
        "auc": window_auc(s, y),
        "logloss": log_loss(s, y),
        "calibration": float(s.mean()) / observed if positives else math.nan,
        "positives": float(positives),
        "negatives": float(y.shape[0] - positives),
        "nonfinite": float(scores.shape[0] - s.shape[0]),
    }
