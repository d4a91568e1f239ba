"""Feature-distribution monitor: per declared feature, histogram divergence vs a reference.

Sparse (hashed id) features are bucketed into the reference's top-k ids + "other";
dense features into the reference's quantile bins; bucket 0 of both is "missing".
Per window and feature it reports PSI and Jensen-Shannon divergence against the
reference histogram, the missing rate, and the *repeat rate*: the share of adjacent
samples (both present) carrying the same value. A healthy feature repeats about as often
as in the reference; a feature stuck at one value repeats ~100% of the time, which
catches a constant feature even when its value falls in the "other" bucket of a
high-cardinality feature, where the histogram alone would not move.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from .base import Assessment, WindowedMonitor
from .batch import ScoredBatch
from .binning import QuantileBuckets, TopKBuckets
from .config import FeatureDriftMonitorConfig
from .stats import segment_js, segment_psi


class FeatureDriftMonitor(WindowedMonitor):
    def __init__(
        self,
        config: FeatureDriftMonitorConfig,
        sparse_features: Sequence[str],
        dense_features: Sequence[str],
        name: str = "feature_drift",
    ) -> None:
        super().__init__(name, config)
        self.config: FeatureDriftMonitorConfig = config
        unknown = set(config.exclude) - set(sparse_features) - set(dense_features)
        if unknown:
            raise ValueError(f"{name}: exclude names undeclared features {sorted(unknown)}")
        self._sparse_cols = _kept_columns(sparse_features, config.exclude)  # (Fs,) into the (B, S) array
        self._dense_cols = _kept_columns(dense_features, config.exclude)  # (Fd,) into the (B, D) array
        self._sparse_names = [sparse_features[i] for i in self._sparse_cols]
        self._dense_names = [dense_features[i] for i in self._dense_cols]
        self.features = self._sparse_names + self._dense_names  # (F,) monitored, sparse first
        self._prev_sparse = np.zeros(len(self._sparse_cols), dtype=np.int64)  # last row seen: adjacency spans chunks
        self._prev_dense = np.full(len(self._dense_cols), np.nan, dtype=np.float32)
        self._reset_reference()
        self._reset_window()

    # -- reference -------------------------------------------------------------------

    def _reset_reference(self) -> None:
        rows = self.config.warmup_windows * self.config.window
        self._buffer_sparse = np.zeros((rows, len(self._sparse_cols)), dtype=np.int64)  # raw reference values
        self._buffer_dense = np.zeros((rows, len(self._dense_cols)), dtype=np.float32)
        self._buffered = 0
        self._ref_repeats = np.zeros((2, len(self.features)), dtype=np.int64)  # pooled (equal, pairs)
        self._set_buckets(None, None)
        self._ref_probs = np.empty(0)  # (K,) reference bucket probabilities, histograms end to end
        self._ref_repeat_rate = np.full(len(self.features), np.nan)

    def _set_buckets(self, sparse: TopKBuckets | None, dense: QuantileBuckets | None) -> None:
        """Install the reference's bucketing (None, None: not learnt yet)."""
        self._sparse_buckets = sparse
        self._dense_buckets = dense
        sizes = np.zeros(0, np.int64)
        if sparse is not None and dense is not None:
            sizes = np.concatenate([sparse.n_buckets, dense.n_buckets])  # (F,)
        self._starts = np.cumsum(sizes) - sizes  # (F,) first bucket of each feature
        self._total_buckets = int(sizes.sum())  # K

    def _learn_reference(self) -> None:
        sparse = self._buffer_sparse[: self._buffered]
        dense = self._buffer_dense[: self._buffered]
        self._set_buckets(
            TopKBuckets.learn(sparse, self.config.top_k), QuantileBuckets.learn(dense, self.config.numeric_bins)
        )
        self._ref_probs = self._histogram(sparse, dense) / self._buffered
        self._ref_repeat_rate = _ratio(*self._ref_repeats)
        self._buffer_sparse = self._buffer_sparse[:0]  # the raw values are no longer needed
        self._buffer_dense = self._buffer_dense[:0]
        self._buffered = 0

    # -- window ----------------------------------------------------------------------

    def _reset_window(self) -> None:
        self._counts = np.zeros(self._total_buckets, dtype=np.int64)  # (K,) bucket counts
        self._repeats = np.zeros((2, len(self.features)), dtype=np.int64)  # (equal, pairs) per feature

    def _accumulate(self, chunk: ScoredBatch, learning: bool) -> None:
        sparse = chunk.sparse[:, self._sparse_cols]  # (n, Fs)
        dense = chunk.dense[:, self._dense_cols]  # (n, Fd)
        self._count_repeats(sparse, dense)
        if learning:
            stop = self._buffered + len(chunk)
            self._buffer_sparse[self._buffered : stop] = sparse
            self._buffer_dense[self._buffered : stop] = dense
            self._buffered = stop
        else:
            self._counts += self._histogram(sparse, dense)

    def _count_repeats(self, sparse: np.ndarray, dense: np.ndarray) -> None:
        ext_s = np.concatenate([self._prev_sparse[None], sparse])  # (n+1, Fs)
        ext_d = np.concatenate([self._prev_dense[None], dense])  # (n+1, Fd)
        present_s = ext_s != 0
        present_d = ~np.isnan(ext_d)
        pairs_s = present_s[1:] & present_s[:-1]
        pairs_d = present_d[1:] & present_d[:-1]
        equal_s = pairs_s & (ext_s[1:] == ext_s[:-1])
        equal_d = ext_d[1:] == ext_d[:-1]  # NaN never equals, so only present pairs count
        self._repeats[0] += np.concatenate([equal_s.sum(0), equal_d.sum(0)])
        self._repeats[1] += np.concatenate([pairs_s.sum(0), pairs_d.sum(0)])
        self._prev_sparse = ext_s[-1].copy()
        self._prev_dense = ext_d[-1].copy()

    def _histogram(self, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """(n, Fs), (n, Fd) -> (K,) bucket counts of every feature, laid end to end."""
        assert self._sparse_buckets is not None and self._dense_buckets is not None, "reference not learnt"
        buckets = np.concatenate([self._sparse_buckets.bucket(sparse), self._dense_buckets.bucket(dense)], axis=1)
        return np.bincount((buckets + self._starts).ravel(), minlength=self._total_buckets)  # (n, F) -> (K,)

    def _close(self, learning: bool, reference_complete: bool) -> Assessment:
        window = self.config.window
        repeat_rate = _ratio(*self._repeats)
        if learning:
            rows = slice(self._buffered - window, self._buffered)
            missing = np.concatenate(
                [(self._buffer_sparse[rows] == 0).mean(0), np.isnan(self._buffer_dense[rows]).mean(0)]
            )
            self._ref_repeats += self._repeats
            if reference_complete:
                self._learn_reference()
            return Assessment(self._per_feature(missing_rate=missing, repeat_rate=repeat_rate))
        cfg = self.config
        probs = self._counts / window
        psi = segment_psi(self._ref_probs, probs, self._starts, cfg.epsilon)
        js = segment_js(self._ref_probs, probs, self._starts)
        missing, ref_missing = probs[self._starts], self._ref_probs[self._starts]
        missing_rise = missing - ref_missing
        repeat_rise = repeat_rate - self._ref_repeat_rate  # NaN (no pairs) compares False below
        problems = []
        for f in np.flatnonzero(
            (psi > (cfg.max_psi or math.inf))
            | (js > (cfg.max_js or math.inf))
            | (missing_rise > cfg.max_missing_rate_increase)
            | (repeat_rise > cfg.max_repeat_rate_increase)
        ):
            parts = [f"PSI {psi[f]:.3f}", f"JS {js[f]:.3f}"]
            if missing_rise[f] > cfg.max_missing_rate_increase:
                parts.append(f"missing {missing[f]:.0%} (reference {ref_missing[f]:.0%})")
            if repeat_rise[f] > cfg.max_repeat_rate_increase:
                ref_rate = self._ref_repeat_rate[f]
                parts.append(f"repeat rate {repeat_rate[f]:.2f} (reference {ref_rate:.2f}): constant value?")
            problems.append(f"{self.features[f]}: " + ", ".join(parts))
        metrics = self._per_feature(psi=psi, js=js, missing_rate=missing, repeat_rate=repeat_rate)
        return Assessment(metrics, problems)

    def _per_feature(self, **values: np.ndarray) -> dict[str, float]:
        return {f"{metric}/{name}": float(v) for metric, arr in values.items() for name, v in zip(self.features, arr)}

    def _adapt(self, metrics: Mapping[str, float]) -> None:
        alpha = self.config.reference_alpha
        self._ref_probs = (1 - alpha) * self._ref_probs + alpha * (self._counts / self.config.window)
        window_rate = _ratio(*self._repeats)
        both = ~np.isnan(window_rate) & ~np.isnan(self._ref_repeat_rate)
        self._ref_repeat_rate[both] = (1 - alpha) * self._ref_repeat_rate[both] + alpha * window_rate[both]

    # -- state -----------------------------------------------------------------------

    def _layout(self) -> dict[str, Any]:
        return {
            "top_k": self.config.top_k,
            "numeric_bins": self.config.numeric_bins,
            "sparse_features": list(self._sparse_names),
            "dense_features": list(self._dense_names),
        }

    def _state(self) -> dict[str, Any]:
        return {
            "counts": self._counts.copy(),
            "repeats": self._repeats.copy(),
            "prev_sparse": self._prev_sparse.copy(),
            "prev_dense": self._prev_dense.copy(),
            "buffer_sparse": self._buffer_sparse[: self._buffered].copy(),
            "buffer_dense": self._buffer_dense[: self._buffered].copy(),
            "ref_repeats": self._ref_repeats.copy(),
            "sparse_buckets": {} if self._sparse_buckets is None else self._sparse_buckets.state_dict(),
            "dense_buckets": {} if self._dense_buckets is None else self._dense_buckets.state_dict(),
            "ref_probs": self._ref_probs.copy(),
            "ref_repeat_rate": self._ref_repeat_rate.copy(),
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        self._reset_reference()
        if state["sparse_buckets"]:
            self._set_buckets(
                TopKBuckets.from_state(state["sparse_buckets"]), QuantileBuckets.from_state(state["dense_buckets"])
            )
            self._buffer_sparse = self._buffer_sparse[:0]
            self._buffer_dense = self._buffer_dense[:0]
        else:
            self._buffered = len(state["buffer_sparse"])
            self._buffer_sparse[: self._buffered] = state["buffer_sparse"]
            self._buffer_dense[: self._buffered] = state["buffer_dense"]
        self._ref_repeats = np.array(state["ref_repeats"], dtype=np.int64)
        self._ref_probs = np.array(state["ref_probs"], dtype=np.float64)
        self._ref_repeat_rate = np.array(state["ref_repeat_rate"], dtype=np.float64)
        self._counts = np.array(state["counts"], dtype=np.int64)
        self._repeats = np.array(state["repeats"], dtype=np.int64)
        self._prev_sparse = np.array(state["prev_sparse"], dtype=np.int64)
        self._prev_dense = np.array(state["prev_dense"], dtype=np.float32)


def _kept_columns(names: Sequence[str], exclude: tuple[str, ...]) -> np.ndarray:
    return np.array([i for i, name in enumerate(names) if name not in exclude], dtype=np.intp)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise ratio, NaN where the denominator is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denominator > 0, numerator / np.maximum(denominator, 1), np.nan)
