"""Pure statistics and binning: exact AUC, its standard error, PSI/JS, log-loss, binners."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from monitors.binning import QuantileBuckets, TopKBuckets
from monitors.stats import auc_standard_error, log_loss, segment_js, segment_psi, window_auc


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Brute force: P(score_pos > score_neg) + 1/2 P(tie) over all positive/negative pairs."""
    pos, neg = scores[labels][:, None], scores[~labels][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


@given(
    st.lists(
        st.tuples(st.one_of(st.integers(0, 4).map(float), st.floats(0, 1, allow_nan=False)), st.booleans()),
        min_size=2,
        max_size=80,
    )
)
def test_window_auc_equals_pairwise_auc_with_ties(rows: list[tuple[float, bool]]) -> None:
    scores = np.array([s for s, _ in rows])
    labels = np.array([y for _, y in rows])
    if labels.all() or not labels.any():
        assert math.isnan(window_auc(scores, labels))
    else:
        assert window_auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)


def test_window_auc_extremes() -> None:
    labels = np.array([False, False, True, True])
    assert window_auc(np.array([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert window_auc(np.array([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert window_auc(np.full(4, 0.5), labels) == 0.5


def test_auc_standard_error_matches_spread_of_window_aucs() -> None:
    rng = np.random.default_rng(0)
    aucs, ses = [], []
    for _ in range(300):
        labels = rng.random(2000) < 0.1
        scores = rng.normal(labels * 1.0, 1.0)
        aucs.append(window_auc(scores, labels))
        ses.append(auc_standard_error(aucs[-1], int(labels.sum()), int((~labels).sum())))
    assert np.std(aucs) == pytest.approx(np.mean(ses), rel=0.2)


def test_log_loss_of_a_perfect_and_a_coin_scorer() -> None:
    labels = np.array([True, False, True, False])
    assert log_loss(labels.astype(float), labels) < 1e-6
    assert log_loss(np.full(4, 0.5), labels) == pytest.approx(math.log(2))


def test_psi_and_js_are_zero_on_identical_histograms_and_grow_with_shift() -> None:
    rng = np.random.default_rng(1)
    p = np.concatenate([rng.dirichlet(np.ones(5)), rng.dirichlet(np.ones(12))])
    starts = np.array([0, 5])
    np.testing.assert_allclose(segment_psi(p, p, starts, 1e-4), 0.0, atol=1e-15)
    np.testing.assert_allclose(segment_js(p, p, starts), 0.0, atol=1e-15)
    q = p.copy()
    q[:5] = q[:5][::-1]  # first histogram shifted, second unchanged
    psi, js = segment_psi(p, q, starts, 1e-4), segment_js(p, q, starts)
    assert psi[0] > 0.05 and psi[1] == 0.0
    assert 0 < js[0] <= math.log(2) and js[1] == 0.0


def test_psi_of_two_samples_from_one_distribution_is_noise_level() -> None:
    rng = np.random.default_rng(2)
    buckets = QuantileBuckets.learn(rng.normal(size=(40_000, 1)).astype(np.float32), 10)
    n = int(buckets.n_buckets[0])
    ref = np.bincount(buckets.bucket(rng.normal(size=(40_000, 1))).ravel(), minlength=n) / 40_000
    win = np.bincount(buckets.bucket(rng.normal(size=(20_000, 1))).ravel(), minlength=n) / 20_000
    assert segment_psi(ref, win, np.array([0]), 1e-4)[0] < 0.005


def test_topk_buckets_missing_known_and_other_per_feature() -> None:
    values = np.array([[7, 1], [7, 1], [7, 2], [3, 2], [3, 0], [9, 0], [0, 0], [0, 0], [5, 0]], dtype=np.int64)
    buckets = TopKBuckets.learn(values, top_k=2)
    assert [k.tolist() for k in buckets.keys] == [[3, 7], [1, 2]]
    probe = np.array([[0, 0], [3, 1], [7, 2], [9, 7], [5, 3], [1, 100]], dtype=np.int64)
    np.testing.assert_array_equal(buckets.bucket(probe), [[0, 0], [1, 1], [2, 2], [3, 3], [3, 3], [3, 3]])
    np.testing.assert_array_equal(buckets.n_buckets, [4, 4])


def test_topk_buckets_break_count_ties_by_id_and_handle_features_without_ids() -> None:
    values = np.array([[5, 0], [4, 0], [6, 0], [5, 0], [4, 0], [6, 0]], dtype=np.int64)
    buckets = TopKBuckets.learn(values, top_k=2)
    assert [k.tolist() for k in buckets.keys] == [[4, 5], []]
    np.testing.assert_array_equal(buckets.bucket(np.array([[0, 0], [6, 8]])), [[0, 0], [3, 1]])


def test_quantile_buckets_collapse_ties_and_put_nan_in_bucket_zero() -> None:
    values = np.stack([np.full(100, 2.0), np.arange(100.0), np.full(100, np.nan)], axis=1).astype(np.float32)
    buckets = QuantileBuckets.learn(values, 4)
    assert [e.tolist() for e in buckets.edges] == [[2.0], [24.75, 49.5, 74.25], []]
    probe = np.array([[np.nan, np.nan, 1.0], [1.0, -5.0, np.nan], [2.0, 49.5, 7.0], [np.inf, np.inf, -np.inf]])
    np.testing.assert_array_equal(buckets.bucket(probe), [[0, 0, 1], [1, 1, 0], [2, 3, 1], [2, 4, 1]])


@pytest.mark.parametrize("seed", range(3))
def test_vectorised_buckets_match_a_per_column_lookup(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 40, size=(3000, 5)) * 1_000_003  # id 0 (missing) included
    dense = rng.normal(size=(3000, 4)).round(1)  # ties on purpose
    dense[rng.random(dense.shape) < 0.05] = np.nan
    top, quant = TopKBuckets.learn(ids, top_k=7), QuantileBuckets.learn(dense, 6)
    probe_ids, probe_dense = rng.integers(0, 60, size=(500, 5)) * 1_000_003, rng.normal(size=(500, 4)) * 2
    for f, keys in enumerate(top.keys):
        lookup = {int(k): i + 1 for i, k in enumerate(keys)}
        by_dict = [0 if v == 0 else lookup.get(int(v), len(keys) + 1) for v in probe_ids[:, f]]
        np.testing.assert_array_equal(top.bucket(probe_ids)[:, f], by_dict)
    for f, edges in enumerate(quant.edges):
        by_search = np.searchsorted(edges, probe_dense[:, f], side="right") + 1
        np.testing.assert_array_equal(quant.bucket(probe_dense)[:, f], by_search)
    for cls, buckets in ((TopKBuckets, top), (QuantileBuckets, quant)):
        restored = cls.from_state(buckets.state_dict())
        np.testing.assert_array_equal(restored.n_buckets, buckets.n_buckets)
