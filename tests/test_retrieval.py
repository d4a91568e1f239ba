"""Retrieval losses on hand-computed cases, and the FAISS index against brute force."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch

from streamtrain.modules.config import RetrievalConfig
from streamtrain.modules.retrieval import RetrievalHead, info_nce_loss, rank_package_loss
from streamtrain.retrieval.index import RetrievalIndex


def _lse(xs: list[float]) -> float:
    return math.log(sum(math.exp(x) for x in xs))


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


USER = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
POS = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
NEG = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]], [[1.0, 0.0], [0.0, -1.0], [0.6, 0.8]]])
# row 0: an empty slot, a copy of its positive, one real negative; row 1: real, empty, copy
NEG_IDS = torch.tensor([[0, 10, 30], [40, 0, 20]])


@pytest.mark.parametrize("in_batch", [True, False])
def test_info_nce_masks_empty_slots_and_copies_of_the_positive(in_batch: bool) -> None:
    got = info_nce_loss(USER, POS, torch.tensor([10, 20]), NEG, NEG_IDS, torch.ones(2), 0.5, in_batch)
    # scores / τ: row 0 positive 0.6, negative 30 → -1, in-batch item 20 → 0.8
    #             row 1 positive 0.6, negative 40 →  0, in-batch item 10 → 0.8
    row0 = [1.2, -2.0] + ([1.6] if in_batch else [])
    row1 = [1.2, 0.0] + ([1.6] if in_batch else [])
    want = ((_lse(row0) - 1.2) + (_lse(row1) - 1.2)) / 2
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_info_nce_masks_in_batch_rows_with_the_same_item_and_weights_rows() -> None:
    weights = torch.tensor([1.0, 0.0])  # row 1 (say, no click) does not count
    got = info_nce_loss(USER, POS, torch.tensor([10, 10]), NEG, NEG_IDS, weights, 0.5, True)
    assert got.item() == pytest.approx(_lse([1.2, -2.0]) - 1.2, rel=1e-6)  # row 1's item is row 0's positive


def test_info_nce_with_no_weighted_row_is_zero_with_a_gradient() -> None:
    user = USER.clone().requires_grad_(True)
    got = info_nce_loss(user, POS, torch.tensor([10, 20]), NEG, NEG_IDS, torch.zeros(2), 0.5, True)
    got.backward()
    assert got.item() == 0.0 and torch.equal(user.grad, torch.zeros_like(user))


SCORES = torch.tensor([[2.0, 0.5, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]])
GRADES = torch.tensor([3, 2, 1, 0])
VALID = torch.tensor([[True, True, False, True], [True, False, False, False]])


def test_pairwise_rank_loss_by_hand() -> None:
    got = rank_package_loss(SCORES, GRADES, VALID, torch.ones(2), "pairwise")
    # row 0 valid pairs (better, worse): (0, 1), (0, 3), (1, 3); row 1 has no pair and is skipped
    want = (_softplus(0.5 - 2.0) + _softplus(-1.0 - 2.0) + _softplus(-1.0 - 0.5)) / 3
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_listwise_rank_loss_by_hand() -> None:
    got = rank_package_loss(SCORES, GRADES, VALID, torch.tensor([1.0, 0.0]), "listwise")
    grades, scores = [3.0, 2.0, 0.0], [2.0, 0.5, -1.0]  # row 0's valid candidates
    target = [math.exp(g - _lse(grades)) for g in grades]
    want = -sum(t * (s - _lse(scores)) for t, s in zip(target, scores))
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_rank_loss_rows_without_candidates_stay_finite() -> None:
    scores = torch.zeros(1, 3, requires_grad=True)
    valid = torch.zeros(1, 3, dtype=torch.bool)
    for kind in ("pairwise", "listwise"):
        loss = rank_package_loss(scores, torch.tensor([2, 1, 0]), valid, torch.ones(1), kind)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(scores.grad).all()


def test_head_vectors_are_unit_norm() -> None:
    head = RetrievalHead(RetrievalConfig(dim=6), user_in=4, item_in=3)
    norms = [head.user_vectors(torch.randn(5, 4)).norm(dim=-1), head.item_vectors(torch.randn(2, 7, 3)).norm(dim=-1)]
    for n in norms:
        torch.testing.assert_close(n, torch.ones_like(n))


def _world(n: int = 500, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = 1 + rng.choice(10**9, size=n, replace=False)  # sparse, hash-like item ids
    return ids, rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(10, d)).astype(np.float32)


def test_faiss_top_k_is_the_exact_top_k() -> None:
    ids, vectors, queries = _world()
    scores, got = RetrievalIndex.build(ids, vectors, device="cpu").search(queries, 7)
    brute = queries @ vectors.T  # (10, 500)
    best = np.argsort(-brute, axis=1)[:, :7]
    np.testing.assert_array_equal(got, ids[best])
    np.testing.assert_allclose(scores, np.take_along_axis(brute, best, 1), rtol=1e-5)


def test_index_round_trips_through_bytes() -> None:
    ids, vectors, queries = _world(seed=1)
    index = RetrievalIndex.build(ids, vectors, device="cpu")
    data = index.to_bytes()
    assert isinstance(data, bytes) and not data.startswith(b"\x80")  # FAISS format, not a pickle
    loaded = RetrievalIndex.from_bytes(data, device="cpu")
    assert len(loaded) == len(index) and loaded.dim == index.dim
    for a, b in zip(index.search(queries, 5), loaded.search(queries, 5)):
        np.testing.assert_array_equal(a, b)


def test_search_beyond_the_index_size_pads_with_minus_one() -> None:
    index = RetrievalIndex.build(np.array([5, 7]), np.eye(2, dtype=np.float32), device="cpu")
    _, got = index.search(np.array([[1.0, 0.5]], dtype=np.float32), 3)
    assert got.tolist() == [[5, 7, -1]]


@pytest.mark.parametrize("ids", [np.array([1, 1, 2]), np.array([0, 1, 2])], ids=["duplicate", "zero"])
def test_index_rejects_bad_ids(ids: np.ndarray) -> None:
    with pytest.raises(ValueError, match="unique and non-zero"):
        RetrievalIndex.build(ids, np.zeros((3, 4), dtype=np.float32))


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0, reason="a GPU is present")
def test_gpu_without_faiss_gpu_raises() -> None:
    with pytest.raises(RuntimeError, match="faiss-gpu"):
        RetrievalIndex.build(np.array([1]), np.zeros((1, 4), dtype=np.float32), device="gpu")
