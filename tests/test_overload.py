"""Overload down-sampling (streamtrain/runtime/overload.py): the keep decision, the weights
and their calibration, the rate policy, and the down-sampler's replay exactness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from consumers.batching import SampleBuffer
from consumers.schema import SAMPLE_FIELDS, SampleBatch, concat_batches, slice_batch
from streamtrain.config import OverloadConfig
from streamtrain.modules.config import ESMMConfig
from streamtrain.modules.esmm import esmm_loss
from streamtrain.runtime.overload import (
    Backlog,
    BacklogMeter,
    DownSampler,
    keep_fraction,
    keep_mask,
    loss_weight,
    next_rate,
)

MASK64 = (1 << 64) - 1


def _splitmix64_reference(sample_id: int) -> float:
    """The keep fraction written out in plain Python integers, independently of numpy."""
    z = (sample_id & MASK64) ^ 0x6F7665726C6F6164
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return (z >> 11) / 2**53


def samples(n: int, ctr: float = 0.1, seed: int = 0, first_id: int = 1) -> SampleBatch:
    """``n`` synthetic samples: ids ``first_id..``, clicks at rate ``ctr``, a conversion on a third of them."""
    rng = np.random.default_rng(seed)
    dims = {"L": 2, "K": 1, "S": 1, "D": 1, "P": 5}
    batch = {name: np.zeros((n, *(dims[d] for d in spec.shape)), spec.dtype) for name, spec in SAMPLE_FIELDS.items()}
    batch["sample_id"] = np.arange(first_id, first_id + n, dtype=np.int64) * 0x9E3779B1  # spread like real hashes
    batch["click"] = (rng.random(n) < ctr).astype(np.float32)
    batch["convert"] = batch["click"] * (rng.random(n) < 1 / 3).astype(np.float32)
    batch["ts"] = np.arange(n, dtype=np.int64)
    return batch


# ------------------------------------------------------------------ the keep decision
def test_keep_fraction_is_splitmix64_of_the_id_and_uniform() -> None:
    ids = np.array([1, 2, 12345, -7, 2**62 + 3, np.iinfo(np.int64).max], np.int64)
    assert keep_fraction(ids).tolist() == [_splitmix64_reference(int(i)) for i in ids]
    u = keep_fraction(samples(200_000)["sample_id"])
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005
    assert abs((u < 0.3).mean() - 0.3) < 0.005


def test_positives_are_never_dropped_and_negatives_kept_at_the_rate() -> None:
    batch = samples(100_000, ctr=0.1)
    keep = keep_mask(batch, 0.25)
    clicked = batch["click"] > 0
    assert keep[clicked].all()
    assert abs(keep[~clicked].mean() - 0.25) < 0.01
    assert keep_mask(batch, 1.0).all()


def test_decision_depends_on_the_id_only_and_rates_nest() -> None:
    batch = samples(20_000, ctr=0.0)
    order = np.random.default_rng(1).permutation(20_000)
    shuffled = {k: v[order] for k, v in batch.items()}
    assert np.array_equal(keep_mask(shuffled, 0.3), keep_mask(batch, 0.3)[order])
    # A row kept at a low rate is kept at every higher one: raising the rate never drops it.
    low, high = keep_mask(batch, 0.2), keep_mask(batch, 0.5)
    assert not (low & ~high).any() and high.sum() > low.sum()


def test_emit_then_correct_pair_is_kept_together() -> None:
    """A correction shares its exposure's sample_id; both rows are clicked (the conversion
    came after a click that was final at the first emission): both kept at any rate."""
    batch = samples(2000, ctr=0.0)
    dropped = np.flatnonzero(~keep_mask(batch, 0.01))[:50]
    first = {k: v[dropped] for k, v in batch.items()}
    first["click"][:] = 1.0  # first emission: clicked, not (yet) converted
    correction = {k: v.copy() for k, v in first.items()}
    correction["convert"][:] = 1.0
    correction["is_correction"][:] = True
    pair = concat_batches([first, correction])
    assert keep_mask(pair, 0.01).all()
    assert (loss_weight(pair, np.full(100, 0.01)) == 1.0).all()


def test_weights_are_one_over_rate_on_negatives_only() -> None:
    batch = samples(1000, ctr=0.2)
    weights = loss_weight(batch, np.full(1000, 0.25))
    assert weights.dtype == np.float32
    assert np.array_equal(weights, np.where(batch["click"] > 0, 1.0, 4.0).astype(np.float32))


# ------------------------------------------------------------------ calibration
def test_weighted_loss_expectation_matches_the_unsampled_loss() -> None:
    """On synthetic rows with a model whose logits vary: the ESMM loss over the kept rows with
    1/rate weights estimates the loss over all rows; without the weights it is biased."""
    n, rate = 400_000, 0.2
    batch = samples(n, ctr=0.05, seed=3)
    rng = np.random.default_rng(4)
    ctr_logit = torch.from_numpy(rng.normal(-3.0, 1.0, n).astype(np.float32))
    cvr_logit = torch.from_numpy(rng.normal(-1.0, 1.0, n).astype(np.float32))
    cfg = ESMMConfig()

    def loss(rows: np.ndarray, weight: torch.Tensor | None) -> dict[str, float]:
        parts = esmm_loss(ctr_logit[rows], cvr_logit[rows], torch.from_numpy(batch["click"][rows]),
                          torch.from_numpy(batch["convert"][rows]), torch.from_numpy(batch["is_correction"][rows]),
                          cfg, weight)
        return {k: float(v) for k, v in parts.items()}

    everything = loss(np.arange(n), None)
    kept = np.flatnonzero(keep_mask(batch, rate))
    assert len(kept) < 0.3 * n
    weighted = loss(kept, torch.from_numpy(loss_weight({k: v[kept] for k, v in batch.items()}, np.full(len(kept), rate))))
    unweighted = loss(kept, None)
    for name in ("ctr", "ctcvr"):
        assert weighted[name] == pytest.approx(everything[name], rel=0.02), name
        assert abs(unweighted[name] - everything[name]) > 0.2 * everything[name], name


def test_weighted_loss_minimiser_is_the_unsampled_click_rate() -> None:
    """Calibration: the constant predictor that minimises the weighted CTR loss on the kept
    rows predicts the click rate of all rows (gradient descent on one logit)."""
    batch = samples(60_000, ctr=0.04, seed=5)
    kept = {k: v[keep_mask(batch, 0.1)] for k, v in batch.items()}
    weight = torch.from_numpy(loss_weight(kept, np.full(len(kept["sample_id"]), 0.1)))
    click = torch.from_numpy(kept["click"])
    logit = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.Adam([logit], lr=0.1)
    for _ in range(250):
        optimizer.zero_grad()
        parts = esmm_loss(logit.expand(len(click)), torch.zeros(len(click)), click, torch.from_numpy(kept["convert"]),
                          torch.from_numpy(kept["is_correction"]), ESMMConfig(ctcvr_weight=0.0), weight)
        parts["ctr"].backward()
        optimizer.step()
    true_ctr = float(batch["click"].mean())
    assert float(torch.sigmoid(logit.detach())) == pytest.approx(true_ctr, rel=0.05)
    assert float(click.mean()) > 2 * true_ctr  # the kept rows alone would say otherwise


def test_no_weight_is_the_plain_mean_bit_for_bit() -> None:
    batch = samples(512, ctr=0.1)
    args = (torch.linspace(-3, 3, 512), torch.linspace(2, -2, 512), torch.from_numpy(batch["click"]),
            torch.from_numpy(batch["convert"]), torch.from_numpy(batch["is_correction"]), ESMMConfig())
    plain, ones = esmm_loss(*args), esmm_loss(*args, torch.ones(512))
    assert float(plain["ctr"]) == pytest.approx(float(ones["ctr"]), rel=1e-6)
    manual = torch.nn.functional.binary_cross_entropy_with_logits(args[0], args[2])
    assert torch.equal(plain["ctr"], manual)


# ------------------------------------------------------------------ the rate policy
def _auto(**kw: float) -> OverloadConfig:
    return OverloadConfig(mode="auto", **kw)


def test_auto_halves_only_on_a_long_growing_backlog_and_recovers_with_hysteresis() -> None:
    cfg = _auto(min_keep_rate=0.1, backlog_high_s=30, backlog_low_s=5)
    long_growing, long_shrinking = Backlog(10_000, 40.0, True), Backlog(10_000, 40.0, False)
    middle, short = Backlog(1_000, 15.0, True), Backlog(10, 1.0, False)
    assert next_rate(cfg, 1.0, long_growing) == 0.5
    assert next_rate(cfg, 0.125, long_growing) == 0.1  # the floor
    assert next_rate(cfg, 0.1, long_growing) == 0.1
    assert next_rate(cfg, 1.0, long_shrinking) == 1.0  # a replay / catch-up trains in full
    assert next_rate(cfg, 0.25, middle) == 0.25  # inside the band: hold
    assert next_rate(cfg, 0.25, short) == 0.5
    assert next_rate(cfg, 0.8, short) == 1.0
    assert next_rate(cfg, 0.5, None) == 0.5  # nothing measured yet: hold
    stalled = Backlog(500, math.inf, False)  # broker stalled: nothing consumed, nothing new
    assert next_rate(cfg, 1.0, stalled) == 1.0


def test_fixed_and_off_ignore_the_backlog() -> None:
    long_growing = Backlog(10_000, 400.0, True)
    assert next_rate(OverloadConfig(mode="fixed", keep_rate=0.3), 1.0, long_growing) == 0.3
    assert next_rate(OverloadConfig(mode="fixed", keep_rate=0.3), 0.3, None) == 0.3
    assert next_rate(OverloadConfig(mode="off"), 0.5, long_growing) == 1.0


def test_hysteresis_band_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="backlog_low_s"):
        OverloadConfig(backlog_low_s=30, backlog_high_s=30)


def test_backlog_meter_measures_speed_and_growth_per_window() -> None:
    meter = BacklogMeter(window_s=5.0)
    assert meter.observe(0.0, consumed=0, lag_events=1000) is None
    assert meter.observe(4.0, consumed=400, lag_events=1200) is None  # window not over
    backlog = meter.observe(5.0, consumed=500, lag_events=1500)
    assert backlog == Backlog(1500, 15.0, True)  # 100 messages/s, lag rose 1000 -> 1500
    assert meter.observe(6.0, consumed=700, lag_events=1300) == backlog  # kept until the next window closes
    assert meter.observe(10.0, consumed=1500, lag_events=200) == Backlog(200, 1.0, False)  # 200 messages/s
    assert meter.observe(15.0, consumed=1500, lag_events=200) == Backlog(200, math.inf, False)


# ------------------------------------------------------------------ the down-sampler
def _feed(raw: SampleBuffer, stream: SampleBatch, cuts: list[int]) -> None:
    for start, stop in zip([0, *cuts], [*cuts, len(stream["sample_id"])]):
        raw.extend(slice_batch(stream, start, stop))


def _run(stream: SampleBatch, cuts: list[int], schedule: dict[int, float], batch_size: int = 64,
         restart_at: int | None = None) -> list[SampleBatch]:
    """Every batch the down-sampler hands out for ``stream`` arriving in chunks cut at ``cuts``;
    ``schedule``: batch index -> rate set after that many batches (a checkpoint). With
    ``restart_at``, both buffers go through state_dict/load_state_dict at that batch."""
    raw, sampler = SampleBuffer(batch_size), DownSampler(batch_size, rate=schedule.get(0, 1.0))
    _feed(raw, stream, cuts)
    out: list[SampleBatch] = []
    while True:
        if len(out) in schedule and len(out) > 0:
            sampler.set_rate(schedule[len(out)])
        if restart_at is not None and len(out) == restart_at:
            raw_state, state = raw.state_dict(), sampler.state_dict()
            raw, sampler = SampleBuffer(batch_size), DownSampler(batch_size)
            raw.load_state_dict(raw_state)
            sampler.load_state_dict(state)
            restart_at = None
        kept = sampler.pop_batch(raw) or sampler.drain(raw)
        if kept is None:
            return out
        if kept.watched is not None:
            kept.batch["watched"] = kept.watched
        out.append(kept.batch)


def _same(a: list[SampleBatch], b: list[SampleBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for key in x:
            assert np.array_equal(x[key], y[key]), key


def test_down_sampler_batches_do_not_depend_on_arrival_chunks_and_survive_a_restart() -> None:
    stream = samples(5000, ctr=0.1, seed=7)
    schedule = {0: 1.0, 5: 0.5, 20: 0.25}  # rate changes at two "checkpoints"
    reference = _run(stream, [100, 1000, 4000], schedule)
    _same(reference, _run(stream, [7, 2500, 2600, 4999], schedule))
    for restart in (3, 5, 12, 20, 25):
        _same(reference, _run(stream, [100, 1000, 4000], schedule, restart_at=restart))
    # Every positive trained once, no row twice, negatives thinned.
    trained = np.concatenate([b["sample_id"] for b in reference])
    assert len(np.unique(trained)) == len(trained)
    clicked = stream["sample_id"][stream["click"] > 0]
    assert np.isin(clicked, trained).all()
    assert len(trained) < 0.6 * 5000
    assert all(len(b["sample_id"]) == 64 for b in reference[:-1])


def test_down_sampler_weights_follow_the_rate_each_row_was_filtered_at() -> None:
    stream = samples(3000, ctr=0.1, seed=8)
    batches = _run(stream, [3000], {0: 0.5, 10: 0.25})
    weights = np.concatenate([b["weight"] for b in batches])
    negatives = np.concatenate([b["click"] for b in batches]) == 0
    assert set(np.unique(weights[negatives]).tolist()) == {2.0, 4.0}
    assert (weights[~negatives] == 1.0).all()
    # the monitors watch a label-independent share: about the rate of the positives too
    watched = np.concatenate([b["watched"] for b in batches])
    assert watched[negatives].all()  # a kept negative is under its rate by construction
    assert 0.15 < watched[~negatives].mean() < 0.6


def test_at_rate_one_batches_pass_through_untouched() -> None:
    stream = samples(1000, ctr=0.1, seed=9)
    raw_only, raw = SampleBuffer(64), SampleBuffer(64)
    _feed(raw_only, stream, [300])
    expected = [b for b in iter(raw_only.pop_batch, None)]
    batches = _run(stream, [300], {0: 1.0})
    _same(expected, batches[: len(expected)])
    assert all("weight" not in b and "watched" not in b for b in batches)


def test_down_sampler_state_rejects_mismatched_rates() -> None:
    sampler = DownSampler(8, rate=0.5)
    raw = SampleBuffer(8)
    raw.extend(samples(40, ctr=0.0))
    sampler.pop_batch(raw)
    state = sampler.state_dict()
    state["rates"] = state["rates"][:-1]
    with pytest.raises(ValueError, match="rates"):
        DownSampler(8).load_state_dict(state)
    with pytest.raises(ValueError, match="keep rate"):
        sampler.set_rate(0.0)
