"""Sparse partitions against the clock guard (DESIGN §6.4 and §6.6 together): a legitimate
stream whose events are further apart than ``max_future_ms`` loses nothing and waits a
bounded number of events, while far-future outliers — alone, in short bursts, at a
partition's start — still cost exactly their own DLQ records. Over the list-backed source
and the real pipeline, no broker (the broker runs are tests/test_joiner_hostile_kafka.py
and the MovieLens replay in tests/test_replay.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.pipeline import IngestPipeline
from consumers.schema import SampleBatch, hash_id
from consumers.state import states_equal
from consumers.testing import pipeline_checkpoint, restore_pipeline
from test_joiner_hostile import CFG, DAY, T0, Y2099, Logs, ev, joined, make_pipeline, run, steady, through_npz, \
    without_ledger

SPARSE = CFG.model_copy(update={"confirm_events": 6})  # room for bursts of up to 5 outliers
N = SPARSE.confirm_events
FUTURE, LATENESS = SPARSE.max_future_ms, SPARSE.allowed_lateness_ms
HOUR = 3_600_000


def held_per_partition(pipeline: IngestPipeline) -> list[int]:
    return np.bincount(pipeline.joiner.admission.held.partition).tolist()


def exposures(logs: Logs) -> set[str]:
    return {e["event_id"] for log in logs.values() for e in log if e["type"] == "exposure"}


# ------------------------------------------------------------------ examples
def test_every_gap_longer_than_max_future_waits_n_minus_1_events_and_loses_nothing() -> None:
    log = [ev(f"x{i}", "exposure", T0 + i * 2 * HOUR, user=f"u{i % 3}", request=f"r{i}") for i in range(3 * N)]
    pipeline = make_pipeline({0: log}, SPARSE)
    batches: list[SampleBatch] = []
    for arrived in range(1, len(log) + 1):
        batches += pipeline.poll(1)
        assert pipeline.joiner.counters["events_accepted"] == max(0, arrived - (N - 1))  # each one N-1 arrivals later
        assert pipeline.joiner.partition_watermarks[0] == (None if arrived < N else log[arrived - N]["ts"] - LATENESS)
    got = run({0: log}, SPARSE, pipeline=pipeline)
    got.batches[:0] = batches
    assert got.dlq == [] and set(got.labels({0: log})) == exposures({0: log})
    assert got.counters["partition_anchors"] == len(log) - (N - 1) and got.counters["forced_anchors"] == 1


@pytest.mark.parametrize("where", ["mid-stream", "first-events"])
def test_a_burst_of_fewer_than_n_far_future_events_costs_exactly_its_own_records(where: str) -> None:
    """A bad producer's clock two days ahead, N-1 events in event-time order: as consistent
    as a burst gets, one event short of a confirmation."""
    clean = steady("p", 30)
    burst = [ev(f"bad{i}", "exposure", T0 + 2 * DAY + i * 1000, user="p-a", request=f"bad{i}") for i in range(N - 1)]
    cut = 15 if where == "mid-stream" else 0
    logs = {0: [*clean[:cut], *burst, *clean[cut:]]}
    got = run(logs, SPARSE, flush=False)
    assert got.dead_ids() == dict.fromkeys((e["event_id"] for e in burst), "ts_ahead")  # outvoted before the end
    assert got.pipeline.joiner.partition_watermarks[0] == clean[-1]["ts"] - LATENESS
    got.batches += got.pipeline.flush()
    reference = run({0: clean}, SPARSE)
    assert states_equal(without_ledger(got.samples), without_ledger(reference.samples))
    assert got.counters["dlq.too_late"] == 0


def test_the_limit_n_far_future_events_in_event_time_order_are_a_jump() -> None:
    """The boundary of the rule, pinned: one more event than the burst above and it is
    indistinguishable from a partition whose time jumped — it is trusted."""
    clean = steady("p", 30)
    burst = [ev(f"bad{i}", "exposure", T0 + 2 * DAY + i * 1000, user="p-a", request=f"bad{i}") for i in range(N)]
    got = run({0: [*clean[:15], *burst, *clean[15:]]}, SPARSE, flush=False)
    assert got.pipeline.joiner.partition_watermarks[0] == burst[-1]["ts"] - LATENESS
    assert set(got.dead_ids().values()) == {"too_late"}


def test_far_future_timestamps_out_of_order_never_confirm() -> None:
    """2N garbage timestamps far ahead, zig-zagging: never N in event-time order in a row,
    so the events after them at the partition's time outvote them all."""
    clean = steady("p", 30)
    zigzag = [T0 + (100 - i) * DAY if i % 2 == 0 else T0 + (2 + i) * DAY for i in range(2 * N)]
    garbage = [ev(f"g{i}", "exposure", ts, user="p-a", request=f"g{i}") for i, ts in enumerate(zigzag)]
    logs = {0: [*clean[:10], *garbage, *clean[10:]]}
    got = run(logs, SPARSE, flush=False)
    assert got.dead_ids() == dict.fromkeys((e["event_id"] for e in garbage), "ts_ahead")
    assert got.counters["partition_anchors"] == 1 and got.counters["forced_anchors"] == 0  # only the first events


def test_a_jump_behind_a_straggler_and_a_short_tail_loses_nothing_at_end_of_input() -> None:
    """After a two-day outage: two events of the new time, a straggler from before it, and
    fewer than N more. Nothing confirms online; at the end of input the unopposed events
    are admitted and their time catches up the two the straggler opposed."""
    before, after = steady("p", 20), steady("p2", 3, start=T0 + 2 * DAY)
    straggler = ev("straggler", "exposure", T0 + 19_500, user="p-a", item="i8", request="straggler")
    logs = {0: [*before, *after[:2], straggler, *after[2:]]}
    got = run(logs, SPARSE)
    assert got.dlq == [] and set(got.labels(logs)) == exposures(logs)


def test_an_event_with_nothing_after_it_is_admitted_at_end_of_input() -> None:
    """Nothing tells a bad clock on a partition's last event from a last event after a long
    gap, so end of input admits it: a sparse log keeps its end, and a bad last event can
    make nothing late — nothing comes after it, and flush finalises everything anyway.
    One later event at the partition's time is enough evidence to reject it."""
    clean = {0: steady("p", 10), 1: steady("q", 10)}
    last = ev("last", "exposure", Y2099, user="p-a", request="last")
    logs = {0: [*clean[0], last], 1: clean[1]}
    alone = run(logs)
    assert alone.dlq == [] and set(alone.labels(logs)) == exposures(logs)
    assert alone.counters["forced_anchors"] == 1
    logs[0].append(ev("behind", "exposure", T0 + 20_000, user="p-b", request="behind"))
    opposed = run(logs)
    assert opposed.dead_ids() == {"last": "ts_ahead"} and set(opposed.labels(logs)) == exposures(logs) - {"last"}


# ------------------------------------------------------------------ properties
GAPS = st.one_of(st.integers(0, 3_000), st.integers(0, 3 * FUTURE), st.integers(FUTURE, 40 * DAY))


@st.composite
def sparse_logs(draw: st.DrawFn, max_requests: int = 24) -> dict[int, list[dict[str, Any]]]:
    """1-3 partitions with their own users, each an increasing stream with arbitrary gaps
    (seconds, around ``max_future_ms``, up to weeks); clicks inside the click window and
    conversions inside the convert window, so every event is valid. Arrival order is
    event time plus a jitter within the lateness: time goes backwards a little."""
    logs: dict[int, list[dict[str, Any]]] = {}
    for p in range(draw(st.integers(1, 3))):
        events = []
        ts = T0 + draw(st.integers(0, 30 * DAY))
        for r in range(draw(st.integers(1, max_requests))):
            ts += draw(GAPS)
            base = {"user_id": f"p{p}u{draw(st.integers(0, 1))}", "item_id": f"i{draw(st.integers(0, 3))}",
                    "request_id": f"p{p}r{r}"}
            events.append({"event_id": f"p{p}x{r}", "type": "exposure", "ts": ts, **base})
            if draw(st.booleans()):
                click = ts + draw(st.integers(0, SPARSE.click_window_ms))
                events.append({"event_id": f"p{p}c{r}", "type": "click", "ts": click, **base})
                if draw(st.booleans()):
                    convert = click + draw(st.integers(0, SPARSE.convert_window_ms))
                    events.append({"event_id": f"p{p}v{r}", "type": "convert", "ts": convert, **base})
        arrival = [(e["ts"] + draw(st.integers(0, LATENESS)), i) for i, e in enumerate(events)]
        logs[p] = [events[i] for _, i in sorted(arrival)]
    return logs


def expected_labels(logs: Logs) -> dict[str, tuple[int, int]]:
    """Every exposure with its own click and conversion: all of them join."""
    done = {(e["request_id"], e["type"]) for log in logs.values() for e in log}
    return {e["event_id"]: (int((e["request_id"], "click") in done), int((e["request_id"], "convert") in done))
            for log in logs.values() for e in log if e["type"] == "exposure"}


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs=sparse_logs(), seed=st.integers(0, 2**16), poll=st.integers(1, 30), restart=st.integers(0, 20))
def test_an_increasing_stream_loses_nothing_whatever_its_gaps(logs: dict[int, list[dict[str, Any]]], seed: int,
                                                              poll: int, restart: int) -> None:
    """Every exposure becomes a sample with its labels, nothing is dead-lettered, at most
    N-1 events of a partition wait at any time, and a restart mid-way (another
    interleaving after it) gives the uninterrupted output."""
    reference = run(logs, SPARSE, poll=1000)
    assert reference.dlq == [] and reference.labels(logs) == expected_labels(logs)
    first = make_pipeline(logs, SPARSE, seed=seed)
    before: list[SampleBatch] = []
    for _ in range(restart):
        before += first.poll(poll)
        assert max(held_per_partition(first), default=0) <= N - 1
    second = make_pipeline(logs, SPARSE, seed=seed + 1)
    restore_pipeline(second, through_npz(pipeline_checkpoint(first)))
    source: Any = second.source
    after: list[SampleBatch] = []
    while source.remaining():
        after += second.poll(poll)
        assert max(held_per_partition(second), default=0) <= N - 1
    after += second.flush()
    assert states_equal(joined([*before, *after], SPARSE), reference.samples)
    first_dlq: Any = first.dlq
    second_dlq: Any = second.dlq
    assert first_dlq.rejections == [] and second_dlq.rejections == []


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), logs=sparse_logs())
def test_fewer_than_n_outliers_cost_their_own_records_and_nothing_else(
        data: st.DataObject, logs: dict[int, list[dict[str, Any]]]) -> None:
    """Up to N-1 exposures or clicks far ahead of everything in their partition, anywhere
    before its last valid event (its first events included), alone or as one burst in
    event-time order: each is dead-lettered ``ts_ahead``, and the valid output is that
    of the stream without them."""
    top = max(e["ts"] for log in logs.values() for e in log)
    k = data.draw(st.integers(1, N - 1))
    burst = data.draw(st.booleans())
    hostile = {p: list(log) for p, log in logs.items()}
    start = data.draw(st.integers(top + FUTURE + 1, Y2099 - N * 1000))
    p = pos = 0
    for o in range(k):
        if o == 0 or not burst:
            p = data.draw(st.sampled_from(sorted(logs)))
            last_valid = max(i for i, e in enumerate(hostile[p]) if not e["event_id"].startswith("far"))
            pos = data.draw(st.integers(0, last_valid))
        ts = start + o * 1000 if burst else data.draw(st.integers(top + FUTURE + 1, Y2099))
        far = ev(f"far{o}", data.draw(st.sampled_from(["exposure", "click"])), ts, user=f"p{p}u0", request=f"far{o}")
        hostile[p].insert(pos + (o if burst else 0), far)
    seed = data.draw(st.integers(0, 2**16))
    clean, got = run(logs, SPARSE, seed=seed), run(hostile, SPARSE, seed=seed + 1)
    assert clean.dlq == []
    assert got.dead_ids() == {f"far{o}": "ts_ahead" for o in range(k)}
    assert states_equal(without_ledger(got.samples), without_ledger(clean.samples))
    assert sorted(got.samples["sample_id"].tolist()) == sorted(hash_id(e) for e in exposures(logs))
