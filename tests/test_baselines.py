"""bench/baselines.py: metrics against their definitions, prequential predictors against
plain loops, and the MF baseline learning a planted low-rank world."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from bench.baselines import auc, best_learning_rate, calibration, item_rate_prior, log_loss, online_mf


def pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The definition: P(score of a positive > score of a negative), ties count 1/2."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_the_pairwise_definition_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 40).astype(float)  # few distinct values: many ties
    labels = (rng.random(40) < 0.4).astype(int)
    assert auc(scores, labels) == pytest.approx(pairwise_auc(scores, labels), abs=1e-12)


def test_auc_edge_cases() -> None:
    assert auc(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert auc(np.array([0.5, 0.5, 0.5]), np.array([0, 1, 0])) == 0.5
    assert math.isnan(auc(np.array([0.2, 0.3]), np.array([1, 1])))


def test_log_loss_and_calibration() -> None:
    p = np.array([0.9, 0.2, 0.6, 0.1])
    y = np.array([1, 0, 1, 0])
    assert log_loss(p, y) == pytest.approx(-np.mean(np.log([0.9, 0.8, 0.6, 0.9])))
    assert calibration(p, y) == pytest.approx(np.mean(p) / 0.5)
    assert math.isnan(calibration(p, np.zeros(4)))


def test_item_rate_prior_matches_a_running_loop() -> None:
    rng = np.random.default_rng(3)
    items = rng.integers(0, 7, 300)
    clicks = (rng.random(300) < 0.2).astype(float)
    strength, default = 5.0, 0.1
    expected, n_item, c_item, total = [], {}, {}, 0.0
    for t, (i, c) in enumerate(zip(items.tolist(), clicks.tolist())):
        mean = (total + default) / (t + 1)
        expected.append((c_item.get(i, 0.0) + strength * mean) / (n_item.get(i, 0) + strength))
        n_item[i] = n_item.get(i, 0) + 1
        c_item[i] = c_item.get(i, 0.0) + c
        total += c
    np.testing.assert_allclose(item_rate_prior(items, clicks, strength, default), expected, rtol=1e-12)


def reference_mf(users: list[int], items: list[int], labels: list[float], lr: float, rank: int,
                 init_std: float, seed: int) -> list[float]:
    """Scalar Adagrad logistic MF, one Python float at a time (ids already 0..n-1)."""
    rng = np.random.default_rng(seed)
    p = rng.normal(0.0, init_std, (max(users) + 1, rank)).tolist()
    q = rng.normal(0.0, init_std, (max(items) + 1, rank)).tolist()
    b = {"g": 0.0}
    acc: dict[object, float] = {}

    def step(key: object, value: float, grad: float) -> float:
        acc[key] = acc.get(key, 0.0) + grad * grad
        return value - lr * grad / (math.sqrt(acc[key]) + 1e-8)

    out = []
    for u, i, y in zip(users, items, labels):
        z = b["g"] + b.get(("u", u), 0.0) + b.get(("i", i), 0.0) + sum(a * c for a, c in zip(p[u], q[i]))
        prob = 1.0 / (1.0 + math.exp(-z))
        out.append(prob)
        err = prob - y
        gp = [err * c for c in q[i]]
        gq = [err * a for a in p[u]]
        b["g"] = step("g", b["g"], err)
        b[("u", u)] = step(("bu", u), b.get(("u", u), 0.0), err)
        b[("i", i)] = step(("bi", i), b.get(("i", i), 0.0), err)
        p[u] = [step(("p", u, k), v, g) for k, (v, g) in enumerate(zip(p[u], gp))]
        q[i] = [step(("q", i, k), v, g) for k, (v, g) in enumerate(zip(q[i], gq))]
    return out


def test_online_mf_matches_a_scalar_adagrad_loop_for_every_rate_of_the_grid() -> None:
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 6, 200), rng.integers(0, 9, 200)
    labels = (rng.random(200) < 0.3).astype(float)
    rates = [0.05, 0.3]
    # Ids are remapped to 0..n-1 in sorted order; use ids that are already, so both agree.
    users[:6], items[:9] = np.arange(6), np.arange(9)
    got = online_mf(users * 1000 + 7, items - 50, labels, rates, rank=3, init_std=0.2, seed=4)
    for g, lr in enumerate(rates):
        want = reference_mf(users.tolist(), items.tolist(), labels.tolist(), lr, rank=3, init_std=0.2, seed=4)
        np.testing.assert_allclose(got[g], want, rtol=1e-10)


def test_online_mf_scores_each_row_before_learning_its_label() -> None:
    rng = np.random.default_rng(1)
    users, items = rng.integers(0, 5, 50), rng.integers(0, 5, 50)
    labels = (rng.random(50) < 0.5).astype(float)
    flipped = labels.copy()
    flipped[20] = 1.0 - flipped[20]
    a, b = online_mf(users, items, labels, [0.1]), online_mf(users, items, flipped, [0.1])
    np.testing.assert_array_equal(a[:, :21], b[:, :21])  # row 20's own score cannot see its label
    assert not np.array_equal(a[:, 21:], b[:, 21:])


def test_online_mf_learns_a_planted_low_rank_world_and_the_grid_picks_a_rate() -> None:
    rng = np.random.default_rng(2)
    n_users, n_items, rank, n = 50, 100, 4, 20_000
    uf = rng.normal(size=(n_users, rank)) / np.sqrt(rank)
    vf = rng.normal(size=(n_items, rank)) / np.sqrt(rank)
    users, items = rng.integers(0, n_users, n), rng.integers(0, n_items, n)
    logit = 3.0 * (uf[users] * vf[items]).sum(1) - 1.0  # no item or user effect: only the factors predict
    labels = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(float)
    rates = [0.001, 0.3]
    grid = online_mf(users, items, labels, rates, rank=rank)
    tail = slice(n - n // 5, n)
    lr, best, scores = best_learning_rate(grid, labels, rates, tail)
    assert lr == 0.3 and scores[1] == auc(best[tail], labels[tail]) > scores[0]
    assert auc(best[tail], labels[tail]) > 0.72  # measured 0.76; the oracle reaches 0.80 here
    assert auc(item_rate_prior(items, labels)[tail], labels[tail]) < 0.6  # popularity alone knows little (0.53)
