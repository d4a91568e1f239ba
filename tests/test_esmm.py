"""ESMM loss on hand-computed cases, the delayed-feedback correction, numerical stability,
and the shared-input features."""

from __future__ import annotations

import math

import pytest
import torch

from streamtrain.modules.config import ESMMConfig
from streamtrain.modules.esmm import ContextFeatures, ESMMHeads, dot_interactions, esmm_loss, log1mexp


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def _loss(a, b, click, convert, correction, cfg):
    t = lambda xs: torch.tensor(xs, dtype=torch.float32)  # noqa: E731
    return esmm_loss(t(a), t(b), t(click), t(convert), torch.tensor(correction), cfg)


def test_esmm_loss_equals_the_formula() -> None:
    a, b = [0.3, -1.2, 2.0, 0.0], [-0.5, 0.7, 1.5, -2.0]
    click, convert = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    cfg = ESMMConfig(ctr_weight=0.7, ctcvr_weight=1.3)
    got = _loss(a, b, click, convert, [False] * 4, cfg)
    ctr = sum(_bce(_sigmoid(x), y) for x, y in zip(a, click)) / 4
    ctcvr = sum(_bce(_sigmoid(x) * _sigmoid(z), c * v) for x, z, c, v in zip(a, b, click, convert)) / 4
    assert got["ctr"].item() == pytest.approx(ctr, rel=1e-6)
    assert got["ctcvr"].item() == pytest.approx(ctcvr, rel=1e-6)
    assert got["esmm"].item() == pytest.approx(0.7 * ctr + 1.3 * ctcvr, rel=1e-6)


def test_correction_adds_the_positive_and_cancels_the_fake_negative() -> None:
    a, b = [0.4, -0.3], [1.1, 0.2]
    cfg = ESMMConfig(correction="cancel", correction_weight=0.8)
    # row 0: an ordinary clicked, unconverted exposure; row 1: a correction sample (1, 1)
    got = _loss(a, b, [1.0, 1.0], [0.0, 1.0], [False, True], cfg)
    p0, p1 = _sigmoid(a[0]) * _sigmoid(b[0]), _sigmoid(a[1]) * _sigmoid(b[1])
    assert got["ctr"].item() == pytest.approx(_bce(_sigmoid(a[0]), 1.0) / 2, rel=1e-6)  # the click is not re-counted
    want_ctcvr = (_bce(p0, 0.0) + 0.8 * (-math.log(p1) + math.log(1 - p1))) / 2
    assert got["ctcvr"].item() == pytest.approx(want_ctcvr, rel=1e-6)


def test_fake_negative_plus_correction_is_one_positive() -> None:
    a, b = [0.9], [-0.4]
    cfg = ESMMConfig(correction="cancel")
    fake_negative = _loss(a, b, [1.0], [0.0], [False], cfg)
    correction = _loss(a, b, [1.0], [1.0], [True], cfg)
    positive = _loss(a, b, [1.0], [1.0], [False], cfg)
    for term in ("ctr", "ctcvr", "esmm"):
        assert (fake_negative[term] + correction[term]).item() == pytest.approx(positive[term].item(), rel=1e-6)


def test_correction_none_trains_a_plain_positive() -> None:
    a, b = [0.9], [-0.4]
    got = _loss(a, b, [1.0], [1.0], [True], ESMMConfig(correction="none"))
    want = _loss(a, b, [1.0], [1.0], [False], ESMMConfig(correction="none"))
    assert got["esmm"].item() == pytest.approx(want["esmm"].item())


@pytest.mark.parametrize("correction", [False, True])
def test_extreme_logits_give_finite_loss_and_bounded_gradients(correction: bool) -> None:
    a = torch.tensor([60.0, -60.0, 60.0, -60.0, 0.0], requires_grad=True)
    b = torch.tensor([60.0, 60.0, -60.0, -60.0, 90.0], requires_grad=True)
    ones = torch.ones(5)
    losses = esmm_loss(a, b, ones, torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0]), torch.full((5,), correction), ESMMConfig())
    losses["esmm"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # Each task term has |d/dlogit| <= 1 per row (see modules/esmm.py); two tasks, mean over 5 rows.
    assert a.grad.abs().max() <= 2 / 5 and b.grad.abs().max() <= 2 / 5


def test_log1mexp_matches_float64() -> None:
    x = -torch.logspace(-7, 2, 50, dtype=torch.float64)
    want = torch.log1p(-torch.exp(x))
    torch.testing.assert_close(log1mexp(x.float()).double(), want, rtol=1e-5, atol=1e-7)


def test_context_features_fill_missing_dense_and_flag_it() -> None:
    ctx = ContextFeatures(num_dense=2, num_gap_buckets=8, time_dim=3, prior_eps=1e-4)
    dense = torch.tensor([[float("nan"), -3.0], [100.0, float("nan")]])
    out = ctx(
        torch.tensor([0, 23]), torch.tensor([6, 0]), torch.tensor([0, 99]),  # gap 99 clamps to the last bucket
        dense, torch.tensor([0.0, 0.5]), torch.tensor([1.0, 0.1]),
    )
    assert out.shape == (2, ctx.out_dim) and torch.isfinite(out).all()
    values, missing, priors = out[:, 9:11], out[:, 11:13], out[:, 13:]
    torch.testing.assert_close(values, torch.tensor([[0.0, -math.log1p(3.0)], [math.log1p(100.0), 0.0]]))
    assert missing.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    torch.testing.assert_close(priors[1], torch.logit(torch.tensor([0.5, 0.1])))
    torch.testing.assert_close(priors[0], torch.logit(torch.tensor([1e-4, 1 - 1e-4])))


def test_dot_interactions_are_the_upper_triangle() -> None:
    fields = torch.randn(2, 4, 5)
    got = dot_interactions(fields)
    want = torch.stack([(fields[:, i] * fields[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4)], 1)
    torch.testing.assert_close(got, want)


def test_heads_give_one_logit_per_tower() -> None:
    heads = ESMMHeads(ESMMConfig(hidden=(8, 4)), in_dim=6)
    ctr, cvr = heads(torch.randn(3, 6), torch.randn(3, 2))
    assert ctr.shape == cvr.shape == (3,) and not torch.equal(ctr, cvr)


def test_dot_weights_add_the_weighted_dots_to_the_ctr_logit_only() -> None:
    shared, dots = torch.randn(4, 6), torch.randn(4, 3)
    torch.manual_seed(0)
    plain = ESMMHeads(ESMMConfig(hidden=(8,)), in_dim=6)
    torch.manual_seed(0)  # the same towers
    fwfm = ESMMHeads(ESMMConfig(hidden=(8,)), in_dim=6, dot_weights=torch.tensor([0.0, 1.0, 0.0]))
    (ctr, cvr), (ctr_fm, cvr_fm) = plain(shared, dots), fwfm(shared, dots)
    torch.testing.assert_close(ctr_fm, ctr + dots[:, 1])
    torch.testing.assert_close(cvr_fm, cvr)
    ctr_fm.sum().backward()
    torch.testing.assert_close(fwfm.dot_weights.grad, dots.sum(0))  # learned, from every pair
