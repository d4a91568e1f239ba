"""A deterministic synthetic stream for tests and benchmarks of the monitors.

Labels come from a known click/convert probability per sample and the "model" scores
are exactly those probabilities, so the scorer is perfectly calibrated with a known,
moderate AUC. :class:`Drift` injects the failures the monitors must catch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


@dataclass(frozen=True)
class Drift:
    """What is broken in a batch. The default breaks nothing."""

    ctr_scale: float = 1.0  # true click probability x this; the scores do not follow (a CTR shift)
    noise_scores: bool = False  # scores are shuffled across the batch: no ranking signal, same marginal
    sparse_constant: Mapping[int, int] = field(default_factory=dict)  # column -> constant id (0: all missing)
    sparse_reversed: frozenset[int] = frozenset()  # columns whose popularity order is reversed
    dense_shift: Mapping[int, float] = field(default_factory=dict)  # column -> added offset
    dense_constant: Mapping[int, float] = field(default_factory=dict)  # column -> constant (NaN: all missing)


class SyntheticStream:
    """Columns ``sparse`` (B, S) with Zipf-distributed hashed ids, ``dense`` (B, D) with
    a log-normal and a normal column, 2% missing values, CTR ~10%, CVR ~20% of clicks."""

    def __init__(
        self,
        seed: int,
        sparse_cardinalities: tuple[int, ...] = (20, 500, 100_000),
        n_dense: int = 2,
        ctr_logit: tuple[float, float] = (-2.5, 1.0),  # mean, std of the click logit
        cvr_logit: tuple[float, float] = (-1.5, 1.0),
        missing_rate: float = 0.02,
    ) -> None:
        self._rng = np.random.default_rng(seed)
        self._ids = [self._rng.integers(1, 2**62, size=c, dtype=np.int64) for c in sparse_cardinalities]
        self._cdfs = []  # per column: cumulative Zipf(1.1) popularity
        for c in sparse_cardinalities:
            weights = 1.0 / np.arange(1, c + 1) ** 1.1
            self._cdfs.append(np.cumsum(weights) / weights.sum())
        self._n_dense = n_dense
        self._ctr_logit = ctr_logit
        self._cvr_logit = cvr_logit
        self._missing_rate = missing_rate
        self.sparse_features = [f"item.s{i}" for i in range(len(sparse_cardinalities))]
        self.dense_features = [f"item.d{i}" for i in range(n_dense)]

    def batch(self, size: int, drift: Drift = Drift()) -> dict[str, np.ndarray]:
        """One batch as the keyword arguments of :meth:`MonitorSuite.update`."""
        rng = self._rng
        p_click = _sigmoid(rng.normal(*self._ctr_logit, size))
        p_convert = _sigmoid(rng.normal(*self._cvr_logit, size))
        click = rng.random(size) < np.minimum(1.0, p_click * drift.ctr_scale)
        convert = click & (rng.random(size) < p_convert)
        scores_ctr, scores_ctcvr = p_click, p_click * p_convert
        if drift.noise_scores:
            order = rng.permutation(size)
            scores_ctr, scores_ctcvr = scores_ctr[order], scores_ctcvr[order]
        sparse = np.empty((size, len(self._ids)), dtype=np.int64)
        for col, (ids, cdf) in enumerate(zip(self._ids, self._cdfs)):
            rank = np.minimum(np.searchsorted(cdf, rng.random(size)), len(ids) - 1)
            if col in drift.sparse_reversed:
                rank = len(ids) - 1 - rank
            sparse[:, col] = ids[rank]
            if col in drift.sparse_constant:
                sparse[:, col] = drift.sparse_constant[col]
        dense = np.empty((size, self._n_dense), dtype=np.float32)
        for col in range(self._n_dense):
            values = rng.lognormal(3.0, 1.0, size) if col % 2 == 0 else rng.normal(0.0, 1.0, size)
            dense[:, col] = values + drift.dense_shift.get(col, 0.0)
            if col in drift.dense_constant:
                dense[:, col] = drift.dense_constant[col]
        sparse[rng.random(sparse.shape) < self._missing_rate] = 0
        dense[rng.random(dense.shape) < self._missing_rate] = np.nan
        return {
            "scores_ctr": scores_ctr.astype(np.float32),
            "scores_ctcvr": scores_ctcvr.astype(np.float32),
            "click": click.astype(np.float32),
            "convert": convert.astype(np.float32),
            "sparse": sparse,
            "dense": dense,
        }


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
