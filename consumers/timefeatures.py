"""Calendar features of an event time and log buckets of time gaps (UTC, vectorised)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000


def calendar(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hour 0..23, weekday 0..6 with Monday=0, ISO week 1..53) of ms timestamps."""
    days = ts // MS_PER_DAY
    hour = (ts // MS_PER_HOUR) % 24
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday
    thursday = days - weekday + 3  # the ISO year is the year of the week's Thursday
    year_start = thursday.astype("datetime64[D]").astype("datetime64[Y]").astype("datetime64[D]").astype(np.int64)
    week = (thursday - year_start) // 7 + 1
    return hour.astype(np.int64), weekday.astype(np.int64), week.astype(np.int64)


class GapBuckets:
    """Bucket of a gap ``g`` (ms): 1 for ``g < edges[0]``, ..., ``len(edges)+1`` for
    ``g >= edges[-1]``; 0 is reserved for "no previous event" / padding."""

    def __init__(self, edges_ms: Sequence[int]) -> None:
        self.edges = np.asarray(edges_ms, np.int64)

    @property
    def num_buckets(self) -> int:
        return len(self.edges) + 2

    def __call__(self, gap_ms: np.ndarray, valid: np.ndarray) -> np.ndarray:
        return np.where(valid, 1 + np.searchsorted(self.edges, gap_ms, side="right"), 0).astype(np.int64)
