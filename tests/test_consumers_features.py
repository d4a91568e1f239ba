"""Feature building blocks: calendar and gap buckets, rank package, negatives, popularity
(in-process and Redis), id index eviction, dedupe window, state helpers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.config import JoinerConfig, PopularityConfig
from consumers.dedupe import DedupeWindow, PartitionedDedupe
from consumers.idindex import IdIndex
from consumers.negatives import ItemPool, rank_package
from consumers.popularity import InProcessPopularity
from consumers.schema import Action, Slot
from consumers.state import flatten_state, pack_bytes, states_equal, unflatten_state, unpack_bytes
from consumers.timefeatures import GapBuckets, calendar

E, C, V = int(Action.EXPOSURE), int(Action.CLICK), int(Action.CONVERT)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 4_102_444_800_000), min_size=1, max_size=20))
def test_calendar_matches_datetime(ts: list[int]) -> None:
    hour, weekday, week = calendar(np.array(ts, np.int64))
    for t, h, wd, wk in zip(ts, hour.tolist(), weekday.tolist(), week.tolist()):
        d = dt.datetime.fromtimestamp(t / 1000, dt.timezone.utc)
        assert (h, wd, wk) == (d.hour, d.weekday(), d.isocalendar().week)


def test_gap_buckets_are_log_spaced_and_zero_means_none() -> None:
    buckets = GapBuckets([1000, 2000, 4000])
    gaps = np.array([0, 999, 1000, 3999, 4000, 10**9, 5])
    valid = np.array([True] * 6 + [False])
    assert buckets(gaps, valid).tolist() == [1, 1, 2, 3, 4, 4, 0]
    assert buckets.num_buckets == 5
    edges = JoinerConfig().gap_bucket_edges_ms
    top = GapBuckets(edges)(np.array([10**12]), np.array([True]))[0]
    assert top == JoinerConfig().num_gap_buckets - 1  # the model's embedding size covers every bucket


def test_rank_package_slots() -> None:
    items = np.array([99, 99])
    # one row: cold click 1, hot click 2, exposure of clicked 1 (not exposed-only),
    # cold exposure 3, hot exposure 4, the sample's own item 99 (never used)
    hist_items = np.array([[0, 3, 1, 4, 2, 1, 99], [0, 0, 0, 0, 0, 0, 0]])
    actions = np.array([[0, E, E, E, C, C, C], [0] * 7])
    hot = np.array([[False, False, False, True, True, False, True], [False] * 7])
    sids = np.array([11, 12])
    out = rank_package(items, hist_items, actions, hot, sids, seed=0)
    assert out[0, Slot.COLD_CLICK] == 1 and out[0, Slot.HOT_CLICK] == 2
    assert out[0, Slot.COLD_EXPOSURE] == 3 and out[0, Slot.HOT_EXPOSURE] == 4
    assert out[0, Slot.RANDOM] in {3, 1, 4, 2}
    assert out[1].tolist() == [0] * 5  # empty prefix: every slot empty
    assert (rank_package(items, hist_items, actions, hot, sids, seed=0) == out).all()  # pure function


def test_rank_package_random_slot_is_uniform_over_usable_entries() -> None:
    n = 4000
    hist_items = np.tile(np.array([[0, 5, 6, 7, 8]]), (n, 1))
    actions = np.tile(np.array([[0, E, E, C, E]]), (n, 1))
    picks = rank_package(np.full(n, 8), hist_items, actions, np.zeros_like(hist_items, bool),
                         np.arange(1, n + 1), seed=3)[:, Slot.RANDOM]
    counts = np.bincount(picks, minlength=9)[[5, 6, 7]]
    assert counts.sum() == n and (abs(counts - n / 3) < 0.1 * n).all()


def test_item_pool_negatives_are_seeded_per_sample_and_never_the_positive() -> None:
    pool = ItemPool(size=8)
    pool.observe(np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]))  # ring keeps the last 8
    assert pool.sample(np.array([1]), np.array([0]), 3, seed=0).tolist() == [[0, 0, 0]]  # no snapshot yet
    pool.refresh()
    sids, positives = np.arange(1, 500), np.full(499, 5)
    neg = pool.sample(sids, positives, 4, seed=1)
    assert set(neg.ravel().tolist()) <= {3, 4, 6, 7, 8, 9, 10} and (neg != 5).all()
    again = pool.sample(sids[::-1], positives, 4, seed=1)[::-1]  # batching/order does not matter
    assert (again == neg).all()
    assert not (pool.sample(sids, positives, 4, seed=2) == neg).all()
    single = ItemPool(size=4)
    single.observe(np.array([7]))
    single.refresh()
    assert single.sample(np.array([1, 2]), np.array([7, 3]), 2, seed=0).tolist() == [[0, 0], [7, 7]]


def test_in_process_popularity_uses_the_last_snapshot() -> None:
    pop = InProcessPopularity(PopularityConfig(hot_quantile=0.5, ctr_prior_strength=10, default_ctr=0.1))
    users = np.array([1, 1, 1, 2, 2, 2, 2, 2])
    items = np.array([10, 10, 10, 10, 11, 12, 10, 11])
    actions = np.array([E, E, C, E, E, E, C, C])
    pop.observe(users, items, actions, np.arange(8))
    assert pop.item_popularity(np.array([10])).tolist() == [0.0]  # not visible before refresh
    pop.refresh()
    assert pop.item_popularity(np.array([[10, 11], [12, 99]])).tolist() == [[3.0, 1.0], [1.0, 0.0]]
    assert pop.hot_threshold() == 1.0  # exposure counts [1, 1, 3]: rank 1 of 3
    user_prior, item_prior = pop.ctr_priors(np.array([1, 3]), np.array([10, 99]))
    mean = 3 / 5  # 3 clicks over 5 exposures
    assert user_prior == pytest.approx([(1 + 10 * mean) / (2 + 10), mean])
    assert item_prior == pytest.approx([(2 + 10 * mean) / (3 + 10), mean])
    restored = InProcessPopularity(PopularityConfig(hot_quantile=0.5, ctr_prior_strength=10, default_ctr=0.1))
    restored.load_state_dict(pop.state_dict())
    assert states_equal(restored.state_dict(), pop.state_dict())
    assert restored.ctr_priors(np.array([1]), np.array([10]))[1] == pytest.approx(item_prior[:1])


def test_id_index_evicts_least_recently_seen_down_to_seven_eighths() -> None:
    index = IdIndex(capacity=8, initial=4)
    slots = index.insert(np.arange(1, 11), np.arange(10) * 10)  # grows past its initial size
    assert len(set(slots.tolist())) == 10 and index.lookup(np.array([3, 42])).tolist() == [slots[2], -1]
    index.insert(np.array([1]), np.array([500]))  # id 1 becomes the most recent
    freed = index.evict_over_capacity()
    assert len(index) == 7 and len(freed) == 3
    assert index.lookup(np.array([1, 2, 3, 4, 5])).tolist()[:4] == [slots[0], -1, -1, -1]
    copy = IdIndex(capacity=8)
    copy.load_state_dict(index.state_dict())
    assert (copy.lookup(np.arange(1, 11)) == index.lookup(np.arange(1, 11))).all()
    assert copy.insert(np.array([77]), np.array([1])).tolist() == index.insert(np.array([77]), np.array([1])).tolist()


def test_dedupe_window_forgets_the_oldest_and_round_trips() -> None:
    window = DedupeWindow(3)
    for event_id in (1, 2, 3, 4):
        window.add(event_id)
    assert 1 not in window and all(i in window for i in (2, 3, 4)) and window.ids().tolist() == [2, 3, 4]
    dedupe = PartitionedDedupe(3)
    dedupe.window(5).add(9)
    dedupe.window(1).add(8)
    restored = PartitionedDedupe(3)
    restored.load_state_dict(dedupe.state_dict())
    assert 9 in restored.window(5) and 8 in restored.window(1) and 9 not in restored.window(1)


def test_state_tree_flattens_for_pickle_free_storage() -> None:
    tree = {"format_version": 1, "a": np.arange(3), "nested": {"b": np.ones((2, 2), np.float32), "c": None, "d": [1, 2]},
            "raw": pack_bytes([b"x", None, b"", b"\xff"])}
    doc, arrays = flatten_state(tree)
    assert set(arrays) == {"a", "nested.b", "raw.data", "raw.lengths"}
    assert states_equal(unflatten_state(doc, arrays), tree)
    assert unpack_bytes(tree["raw"]) == [b"x", None, b"", b"\xff"]
    with pytest.raises(ValueError, match="pickle"):
        flatten_state({"bad": np.array([object()], dtype=object)})
