"""The per-batch input of every monitor: prequential scores, labels and features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class ScoredBatch:
    """One batch as the monitors see it; scores were made *before* training on it.

    ``convert`` counts only after a click, so the CTCVR label is ``click & convert``.
    """

    scores_ctr: np.ndarray  # (B,) float64, predicted P(click)
    scores_ctcvr: np.ndarray  # (B,) float64, predicted P(click and convert)
    click: np.ndarray  # (B,) bool
    ctcvr: np.ndarray  # (B,) bool, click & convert
    sparse: np.ndarray  # (B, S) int64, 0 = missing
    dense: np.ndarray  # (B, D) float32, NaN = missing

    @classmethod
    def from_arrays(
        cls,
        scores_ctr: ArrayLike,
        scores_ctcvr: ArrayLike,
        click: ArrayLike,
        convert: ArrayLike,
        sparse: ArrayLike,
        dense: ArrayLike,
    ) -> ScoredBatch:
        """Validate shapes and normalise dtypes (labels may be 0/1 floats or bools)."""
        s_ctr = np.asarray(scores_ctr, dtype=np.float64).reshape(-1)
        s_ctcvr = np.asarray(scores_ctcvr, dtype=np.float64).reshape(-1)
        clicked = np.asarray(click) > 0.5
        converted = np.asarray(convert) > 0.5
        sp = np.asarray(sparse, dtype=np.int64)
        de = np.asarray(dense, dtype=np.float32)
        size = s_ctr.shape[0]
        problems = [
            f"{name} has shape {arr.shape}, expected ({size},)"
            for name, arr in (("scores_ctcvr", s_ctcvr), ("click", clicked), ("convert", converted))
            if arr.shape != (size,)
        ]
        problems += [
            f"{name} has shape {arr.shape}, expected ({size}, n_{name})"
            for name, arr in (("sparse", sp), ("dense", de))
            if arr.ndim != 2 or arr.shape[0] != size
        ]
        if problems:
            raise ValueError("invalid monitor batch: " + "; ".join(problems))
        return cls(s_ctr, s_ctcvr, clicked, clicked & converted, sp, de)

    def __len__(self) -> int:
        return self.scores_ctr.shape[0]

    def rows(self, start: int, stop: int) -> ScoredBatch:
        """Rows ``[start, stop)`` as views (no copy)."""
        return ScoredBatch(
            self.scores_ctr[start:stop],
            self.scores_ctcvr[start:stop],
            self.click[start:stop],
            self.ctcvr[start:stop],
            self.sparse[start:stop],
            self.dense[start:stop],
        )
