"""Bucketing of all sparse / all dense feature columns at once, fixed from the reference.

Per feature, bucket 0 is "missing" (sparse id 0, dense NaN), so the missing rate is part
of the histogram and a feature that goes all-missing moves its whole mass into one bucket.
Both classes bucket a whole (n, F) block with a handful of numpy calls, whatever F is.
"""

from __future__ import annotations

import numpy as np


def _split(flat: np.ndarray, sizes: np.ndarray) -> list[np.ndarray]:
    return np.split(np.asarray(flat), np.cumsum(sizes)[:-1]) if len(sizes) else []


class TopKBuckets:
    """Sparse (hashed int64) features: each feature's ``k`` most frequent reference ids.

    Feature ``f`` has buckets 0 missing, ``1..k_f`` its learnt ids (in id order) and
    ``k_f + 1`` every other id. Lookup is one ``searchsorted`` over the union of all
    learnt ids, then a gather in a (F, G) table from (feature, id) to bucket.
    """

    def __init__(self, keys: list[np.ndarray]) -> None:
        self.keys = [np.sort(np.asarray(k, dtype=np.int64)) for k in keys]  # per feature (k_f,)
        self.n_buckets = np.array([len(k) + 2 for k in self.keys], dtype=np.int64)  # (F,)
        self._ids = np.unique(np.concatenate([np.zeros(1, np.int64), *self.keys]))  # (G,), id 0 first
        self._table = np.repeat((self.n_buckets - 1)[:, None], len(self._ids), axis=1)  # (F, G), "other"
        self._table[:, 0] = 0  # id 0 is "missing" for every feature
        for f, k in enumerate(self.keys):
            self._table[f, np.searchsorted(self._ids, k)] = np.arange(1, len(k) + 1)
        self._rows = np.arange(len(self.keys))[None, :]  # (1, F) row index for the gather

    @classmethod
    def learn(cls, values: np.ndarray, top_k: int) -> TopKBuckets:
        """From (N, F) reference ids; equal counts break by id, so learning is deterministic."""
        keys = []
        for column in values.T:
            ids, counts = np.unique(column[column != 0], return_counts=True)
            keys.append(ids[np.argsort(-counts, kind="stable")[:top_k]])  # ids sorted: ties keep the smaller
        return cls(keys)

    def bucket(self, values: np.ndarray) -> np.ndarray:
        """(n, F) int64 ids -> (n, F) int64 per-feature bucket indices."""
        pos = np.minimum(np.searchsorted(self._ids, values), len(self._ids) - 1)
        found = self._ids[pos] == values
        return np.where(found, self._table[self._rows, pos], self.n_buckets - 1)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"keys": np.concatenate([np.zeros(0, np.int64), *self.keys]), "sizes": self.n_buckets - 2}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> TopKBuckets:
        return cls(_split(state["keys"], state["sizes"]))


class QuantileBuckets:
    """Dense features: bins between each feature's reference quantiles.

    Feature ``f`` has buckets 0 missing (NaN), then ``1 + #(edges_f <= x)``: values outside
    the reference range fall into the first/last bin. Tied quantiles (a discrete or
    constant feature) collapse, so a feature may get fewer bins than asked for.
    """

    def __init__(self, edges: list[np.ndarray]) -> None:
        self.edges = [np.asarray(e, dtype=np.float64) for e in edges]  # per feature (E_f,) increasing
        self._sizes = np.array([len(e) for e in self.edges], dtype=np.int64)  # (F,)
        self.n_buckets = self._sizes + 2
        self._padded = np.full((len(self.edges), max(self._sizes, default=0)), np.inf)  # (F, E)
        for f, e in enumerate(self.edges):
            self._padded[f, : len(e)] = e

    @classmethod
    def learn(cls, values: np.ndarray, n_bins: int) -> QuantileBuckets:
        """From (N, F) reference values (NaN = missing)."""
        edges = []
        for column in values.T:
            finite = column[~np.isnan(column)].astype(np.float64)
            quantiles = np.quantile(finite, np.arange(1, n_bins) / n_bins) if finite.size else np.empty(0)
            edges.append(np.unique(quantiles))
        return cls(edges)

    def bucket(self, values: np.ndarray) -> np.ndarray:
        """(n, F) floats -> (n, F) int64 per-feature bucket indices."""
        at_or_above = (values[:, :, None] >= self._padded[None]).sum(-1)  # (n, F); +inf padding never counts...
        inner = np.minimum(at_or_above, self._sizes) + 1  # ...except for x = +inf, hence the clamp
        return np.where(np.isnan(values), 0, inner)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"edges": np.concatenate([np.zeros(0), *self.edges]), "sizes": self._sizes.copy()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> QuantileBuckets:
        return cls(_split(state["edges"], state["sizes"]))
