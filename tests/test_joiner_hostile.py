"""Hostile input against the pure joiner (over the list-backed source, no broker):
bad producer clocks (DESIGN §6.6), event ids reused across partitions and labels carrying
another user's id (§6.7), re-sent exposures, and poisoned states restored from a
checkpoint. Properties: any interleaving, batching or restart gives the same output
including DLQ reasons; one far-future event never changes which valid events are accepted."""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.config import DecoderConfig, JoinerConfig, PopularityConfig
from consumers.decode import EventDecoder
from consumers.joiner import LabelJoiner
from consumers.pipeline import IngestPipeline
from consumers.popularity import InProcessPopularity
from consumers.reasons import Rejection
from consumers.schema import EventBatch, SampleBatch, concat_batches, empty_batch, hash_id
from consumers.state import flatten_state, states_equal, unflatten_state
from consumers.testing import ListDlqSink, ListSource, pipeline_checkpoint, restore_pipeline

T0 = 1_767_225_600_000  # 2026-01-01
Y2099 = 4_070_908_800_000  # 2099-01-01: passes the decoder (its bound is 2100)
DAY = 86_400_000
CFG = JoinerConfig(click_window_ms=30_000, convert_window_ms=60_000, allowed_lateness_ms=2_000, stats_refresh_ms=20_000,
                   history_len=8, num_random_negatives=3, item_pool_size=64,
                   max_future_ms=600_000, confirm_events=4, max_quarantined=16)
N = CFG.confirm_events
LEDGER = ("partition", "offset")
DATA = Path(__file__).parent / "data"

Logs = Mapping[int, Sequence[dict[str, Any]]]


def ev(eid: str, kind: str, ts: int, user: str = "u1", item: str = "i1", request: str = "r1") -> dict[str, Any]:
    return {"event_id": eid, "type": kind, "ts": ts, "user_id": user, "item_id": item, "request_id": request}


def steady(prefix: str, n: int, start: int = T0, gap: int = 1_000, users: Sequence[str] = ("a", "b")) -> list[dict[str, Any]]:
    """``n`` exposures ``gap`` apart (users in turn), every third clicked half a gap later: one partition's log."""
    out = []
    for i in range(n):
        ts = start + i * gap
        user = f"{prefix}-{users[i % len(users)]}"
        out.append(ev(f"{prefix}x{i}", "exposure", ts, user=user, item=f"i{i % 5}", request=f"{prefix}r{i}"))
        if i % 3 == 0:
            out.append(ev(f"{prefix}c{i}", "click", ts + gap // 2, user=user, item=f"i{i % 5}", request=f"{prefix}r{i}"))
    return sorted(out, key=lambda e: e["ts"])


def encode(logs: Logs) -> dict[int, list[bytes]]:
    return {p: [orjson.dumps(e) for e in log] for p, log in logs.items()}


def make_pipeline(logs: Logs, cfg: JoinerConfig = CFG, seed: int | None = None) -> IngestPipeline:
    decoder = EventDecoder(DecoderConfig(), cfg.sparse_features, cfg.dense_features)
    joiner = LabelJoiner(cfg, InProcessPopularity(PopularityConfig()))
    return IngestPipeline(ListSource(encode(logs), interleave_seed=seed), decoder, joiner, ListDlqSink())


@dataclass
class Outcome:
    batches: list[SampleBatch]
    dlq: list[Rejection]
    pipeline: IngestPipeline
    cfg: JoinerConfig

    @property
    def samples(self) -> SampleBatch:
        return joined(self.batches, self.cfg)

    @property
    def counters(self) -> dict[str, int]:
        return self.pipeline.counters

    def labels(self, logs: Logs) -> dict[str, tuple[int, int]]:
        """event_id of each sampled exposure -> (click, convert)."""
        names = {hash_id(e["event_id"]): e["event_id"] for log in logs.values() for e in log}
        s = self.samples
        return {names[sid]: (int(c), int(v)) for sid, c, v in zip(s["sample_id"].tolist(), s["click"], s["convert"])}

    def dead(self) -> dict[tuple[int, int], str]:
        """(partition, offset) -> DLQ reason."""
        return {(r.partition, r.offset): r.reason.value for r in self.dlq}

    def dead_ids(self) -> dict[str, str]:
        """event_id -> DLQ reason (only where ids are unique)."""
        return {orjson.loads(r.original)["event_id"]: r.reason.value for r in self.dlq}


def joined(batches: Sequence[SampleBatch], cfg: JoinerConfig = CFG) -> SampleBatch:
    empty = empty_batch(cfg.history_len, cfg.num_random_negatives, len(cfg.sparse_features), len(cfg.dense_features))
    return concat_batches([empty, *batches])


def run(logs: Logs, cfg: JoinerConfig = CFG, seed: int | None = None, poll: int = 7, flush: bool = True,
        pipeline: IngestPipeline | None = None) -> Outcome:
    p = pipeline or make_pipeline(logs, cfg, seed)
    batches: list[SampleBatch] = []
    source: Any = p.source
    while source.remaining():
        batches += p.poll(poll)
    if flush:
        batches += p.flush()
    sink: Any = p.dlq
    return Outcome(batches, sink.rejections, p, cfg)


def without_ledger(batch: SampleBatch) -> SampleBatch:
    return {k: v for k, v in batch.items() if k not in LEDGER}


def through_npz(state: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint does to a state: JSON document + npz arrays, no pickle."""
    doc, arrays = flatten_state(state)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        return unflatten_state(orjson.loads(orjson.dumps(doc)), {k: npz[k] for k in npz.files})


# ------------------------------------------------------------------ 1. one bad clock
@pytest.mark.parametrize("bad_ts", [Y2099, T0 + 2 * DAY], ids=["year-2099", "two-days-ahead"])
def test_a_far_future_event_is_held_then_dead_lettered_and_costs_no_valid_event(bad_ts: int) -> None:
    clean = {0: steady("p", 40), 1: steady("q", 40)}
    bad = ev("bad", "exposure", bad_ts, user="p-a", item="i9", request="bad")
    hostile = {0: [*clean[0][:20], bad, *clean[0][20:]], 1: clean[1]}

    reference = run(clean)
    got = run(hostile, flush=False)
    assert got.dead_ids() == {"bad": "ts_ahead"}  # decided by the partition's next N events, not by flush
    got.batches += got.pipeline.flush()
    assert states_equal(without_ledger(got.samples), without_ledger(reference.samples))
    assert got.labels(hostile) == reference.labels(clean) and len(reference.labels(clean)) == 80
    assert got.dead_ids() == {"bad": "ts_ahead"} and got.counters["events_quarantined"] >= 1
    assert got.counters["dlq.too_late"] == 0


def test_the_first_event_of_a_new_partition_cannot_anchor_it_alone() -> None:
    clean = {0: steady("p", 30), 1: steady("q", 30)}
    hostile = {0: clean[0], 1: [ev("bad", "exposure", Y2099, user="q-a", request="bad"), *clean[1]]}
    reference = run(clean)
    got = run(hostile)
    assert states_equal(without_ledger(got.samples), without_ledger(reference.samples))
    assert got.dead_ids() == {"bad": "ts_ahead"}
    assert got.pipeline.joiner.partition_watermarks[1] < T0 + DAY  # type: ignore[operator]


def test_a_legitimate_jump_is_confirmed_by_the_following_events_and_loses_nothing() -> None:
    before, after = steady("p", 20), steady("p2", 20, start=T0 + 2 * DAY)
    straggler = ev("late-but-ok", "exposure", T0 + 19_500, user="p-a", item="i8", request="straggler")
    logs = {0: [*before, *after[:2], straggler, *after[2:]],  # the whole service was down for two days
            1: [*steady("q", 20), *steady("q2", 20, start=T0 + 2 * DAY)]}
    got = run(logs, flush=False)
    assert got.dlq == []  # the straggler only delayed the confirmation
    assert got.pipeline.joiner.partition_watermarks[0] == after[-1]["ts"] - CFG.allowed_lateness_ms
    anchors = got.counters["partition_anchors"]
    got.batches += got.pipeline.flush()
    exposures = {e["event_id"] for log in logs.values() for e in log if e["type"] == "exposure"}
    assert set(got.labels(logs)) == exposures and got.dlq == []
    assert anchors == 4  # per partition: its first events, and the jump


def test_a_slightly_early_event_is_released_when_its_partition_catches_up() -> None:
    log = steady("p", 40, gap=10_000)
    clock = max(e["ts"] for e in log[:10])
    early = ev("early", "exposure", clock + 20_500, user="p-a", item="i9", request="early")  # 500 ms past the horizon
    logs = {0: [*log[:10], early, *log[10:]]}
    got = run(logs, cfg=CFG.model_copy(update={"max_future_ms": 20_000}))
    assert got.dlq == [] and "early" in got.labels(logs)  # released within N events: nothing behind it was lost
    assert got.counters["events_quarantined"] == N + 1  # the first N (bootstrap) and the early one


def test_two_interleaved_clocks_fill_the_quarantine_and_the_valve_decides_by_evidence() -> None:
    """Day-1 and day-3 events alternate: never N of them in event-time order in a row, so
    nothing confirms. Each day-3 event is opposed by the day-1 events after it; no day-1
    event is opposed by anything. Day-1 events pile up until the valve decides the oldest
    held event: never opposed, so it is trusted, and day 1 becomes the partition's time."""
    q = CFG.max_quarantined
    chaos = [ev(f"z{i}", "exposure", T0 + (1 if i % 2 == 0 else 3) * DAY + i, user="p-a", request=f"z{i}")
             for i in range(3 * q + 1)]
    logs = {0: [*steady("p", 8), *chaos]}
    got = run(logs, flush=False)
    assert got.counters["forced_anchors"] == 1 and got.counters["partition_anchors"] == 1  # the valve; the first events
    day1 = {e["event_id"] for e in chaos if e["ts"] < T0 + 2 * DAY}
    day3 = {e["event_id"] for e in chaos} - day1
    assert got.pipeline.joiner.partition_watermarks[0] == chaos[-1]["ts"] - CFG.allowed_lateness_ms  # a day-1 event
    outvoted = {e["event_id"] for k, e in enumerate(chaos) if e["event_id"] in day3
                and sum(later["event_id"] in day1 for later in chaos[k + 1:]) >= N}
    assert got.dead_ids() == dict.fromkeys(outvoted, "ts_ahead") and outvoted
    got.batches += got.pipeline.flush()
    assert got.dead_ids() == dict.fromkeys(day3, "ts_ahead") and day1 <= set(got.labels(logs))


def test_flush_admits_what_nothing_opposed_and_rejects_the_rest() -> None:
    few = [ev("f0", "exposure", T0, user="u"), ev("far", "exposure", Y2099, user="u", request="r2"),
           ev("f1", "exposure", T0 + 500, user="u", request="r3")]  # fewer than N: never anchored online
    anchored = [*steady("q", 10), ev("ahead", "exposure", T0 + DAY, user="q-a", request="ahead"),
                ev("after", "exposure", T0 + 20_000, user="q-b", request="after")]  # in time: opposes "ahead"
    logs = {0: few, 1: anchored}
    got = run(logs, flush=False)
    assert got.pipeline.joiner.partition_watermarks[0] is None and got.dlq == []
    got.batches += got.pipeline.flush()
    assert got.dead_ids() == {"far": "ts_ahead", "ahead": "ts_ahead"}  # each opposed by an event after it
    assert {"f0", "f1", "after"} <= set(got.labels(logs)) and got.counters["forced_anchors"] == 1


@pytest.mark.parametrize("nth_held", [1, 4, 8])
def test_a_restart_mid_quarantine_gives_the_uninterrupted_output(nth_held: int) -> None:
    logs = {0: [*steady("p", 12), ev("bad", "exposure", Y2099, user="p-a", request="bad"), *steady("p2", 12, T0 + 20_000)],
            1: [*steady("q", 12), *steady("q2", 12, start=T0 + DAY)]}  # a jump, confirmed after some restarts
    reference = run(logs, poll=5)
    first = make_pipeline(logs, seed=3)
    before: list[SampleBatch] = []
    seen_held = 0
    while seen_held < nth_held:  # checkpoint at the nth poll that leaves something quarantined
        before += first.poll(2)
        seen_held += first.joiner.quarantined > 0
    state = through_npz(pipeline_checkpoint(first))
    first_dlq: Any = first.dlq
    dead_before = list(first_dlq.rejections)
    first.poll(2)  # progress after the checkpoint is lost with the crash

    second = make_pipeline(logs, seed=8)  # another interleaving after the restart
    restore_pipeline(second, state)
    after = run(logs, pipeline=second, poll=5)
    assert states_equal(joined([*before, *after.batches]), reference.samples)
    assert sorted((r.reason, r.partition, r.offset) for r in dead_before + after.dlq) == \
        sorted((r.reason, r.partition, r.offset) for r in reference.dlq)
    assert after.counters == reference.counters and after.counters["state_repairs"] == 0
    assert reference.dead_ids() == {"bad": "ts_ahead"}


# ------------------------------------------------------------------ 1b. poison in a restored state
def poisoned_event(partition: int, user: str, offset: int) -> EventBatch:
    """A far-future exposure as the decoder makes it, to plant in a crafted state."""
    decoder = EventDecoder(DecoderConfig(), CFG.sparse_features, CFG.dense_features)
    raw = orjson.dumps(ev("poison", "exposure", Y2099, user=user, request="poison"))
    return decoder.decode([raw], [partition], [offset]).events


def plant_poison(state: dict[str, Any], partition: int, user: str, watermark: bool = False) -> dict[str, Any]:
    """What the pre-guard joiner saved after trusting a 2099 event: the event staged and the
    partition's clock (and, with one partition, the watermark) in 2099."""
    joiner = state["pipeline"]["joiner"]
    staged = EventBatch.from_state(joiner["staged"], len(CFG.sparse_features), len(CFG.dense_features))
    joiner["staged"] = EventBatch.concat([staged, poisoned_event(partition, user, 10**6)]).state_dict()
    joiner["admission"]["partitions"][str(partition)]["clock"] = Y2099
    if watermark:
        joiner["watermark"] = Y2099 - CFG.allowed_lateness_ms
    return state


@pytest.mark.parametrize("partitions", [2, 1])
def test_a_poisoned_clock_in_a_restored_state_is_repaired(partitions: int, caplog: pytest.LogCaptureFixture) -> None:
    logs = {p: steady(f"p{p}", 30) for p in range(partitions)}
    reference = run(logs)
    first = make_pipeline(logs)
    before: list[SampleBatch] = []
    for _ in range(6):
        before += first.poll(5)
    first_dlq: Any = first.dlq
    dead_before = list(first_dlq.rejections)
    state = through_npz(plant_poison(pipeline_checkpoint(first), 0, "p0-a", watermark=partitions == 1))

    second = make_pipeline(logs)
    with caplog.at_level(logging.WARNING):
        restore_pipeline(second, state)
    assert second.joiner.counters["state_repairs"] == (1 if partitions == 2 else 2)  # + the watermark
    assert "partition 0" in caplog.text
    assert second.joiner.partition_watermarks[0] < T0 + DAY  # type: ignore[operator]
    after = run(logs, pipeline=second)
    assert states_equal(joined([*before, *after.batches]), reference.samples)  # nothing valid was lost
    assert [r.reason.value for r in dead_before + after.dlq] == [r.reason.value for r in reference.dlq] + ["ts_ahead"]
    assert orjson.loads(after.dlq[-1].original)["event_id"] == "poison"


def test_a_format_1_state_is_upgraded_and_its_poison_does_not_survive(caplog: pytest.LogCaptureFixture) -> None:
    """A real state written by the joiner before the guard (tests/data/make_joiner_state_v1.py):
    it had trusted a 2099 event, so its clock and watermark are in 2099."""
    doc = orjson.loads((DATA / "joiner_state_v1_poisoned.json").read_bytes())
    with np.load(DATA / "joiner_state_v1_poisoned.npz", allow_pickle=False) as npz:
        state = unflatten_state(doc, {k: npz[k] for k in npz.files})
    assert state["format_version"] == 1 and state["partition_max"] == {"0": Y2099}
    joiner = LabelJoiner(CFG, InProcessPopularity(PopularityConfig()))
    with caplog.at_level(logging.WARNING):
        joiner.load_state_dict(state)
    assert joiner.counters["state_repairs"] == 2 and joiner.watermark < T0 + DAY  # the clock and the watermark
    assert joiner.quarantined == 1 and "partition 0" in caplog.text

    later = [ev(f"after-{i}", "exposure", T0 + 40_000 + i * 1000, user=f"u{i % 3}", request=f"after-{i}")
             for i in range(12)]  # the partition's next events: the old state made every one too_late
    decoder = EventDecoder(DecoderConfig(), CFG.sparse_features, CFG.dense_features)
    decoded = decoder.decode([orjson.dumps(e) for e in later], [0] * len(later), list(range(41, 41 + len(later))))
    rejections = joiner.ingest(decoded.events)
    emission = joiner.advance()
    final = joiner.flush()
    dead = [(r.partition, r.offset, r.reason.value) for r in rejections + emission.rejections + final.rejections]
    assert dead == [(0, 40, "ts_ahead")]  # the 2099 event (format 1 kept no bytes of staged exposures)
    sampled = concat_batches([emission.samples, final.samples])["sample_id"].tolist()
    assert sorted(sampled) == sorted(hash_id(e["event_id"]) for e in later)
    assert joiner.state_dict()["format_version"] == 2


def test_an_admission_state_of_format_1_is_upgraded_and_loses_nothing() -> None:
    """Format 1 (before the evidence rule) kept one vote count per held event (in-time
    arrivals since it) and a streak per partition; upgraded, the votes become oppositions
    and every run starts anew. Checkpointed while the 2099 event is held with votes against
    it and the jump without, the restart gives the uninterrupted output."""
    logs = {0: [*steady("p", 12), ev("bad", "exposure", Y2099, user="p-a", request="bad"), *steady("p2", 12, T0 + 20_000)],
            1: [*steady("q", 12), *steady("q2", 12, start=T0 + DAY)]}
    reference = run(logs, poll=5)
    first = make_pipeline(logs, seed=3)
    before: list[SampleBatch] = []
    while True:
        before += first.poll(2)
        opposed = first.joiner.admission.state_dict()["opposed"]
        if opposed.any() and not opposed.all():
            break
    first_dlq: Any = first.dlq
    dead_before = list(first_dlq.rejections)
    state = pipeline_checkpoint(first)
    admission = state["pipeline"]["joiner"]["admission"]
    state["pipeline"]["joiner"]["admission"] = {
        "format_version": 1, "held": admission["held"], "votes": admission["opposed"], "dedupe": admission["dedupe"],
        "partitions": {p: {**lane, "streak": 0} for p, lane in admission["partitions"].items()}}
    second = make_pipeline(logs, seed=8)
    restore_pipeline(second, through_npz(state))
    after = run(logs, pipeline=second, poll=5)
    assert states_equal(joined([*before, *after.batches]), reference.samples)
    assert dead_letters(dead_before + after.dlq) == dead_letters(reference.dlq) and reference.dead_ids() == {"bad": "ts_ahead"}
    assert second.joiner.state_dict()["admission"]["format_version"] == 2


# ------------------------------------------------------------------ 2. event ids are unique per topic
@pytest.mark.parametrize("shift,winner", [(0, 0), (-1, 1), (1, 0)])
def test_an_event_id_on_two_partitions_is_kept_once_in_canonical_order(shift: int, winner: int) -> None:
    """Same event ids under another user (so another partition): the copy first in
    (ts, type, id, partition, offset) order is kept, the other dead-lettered — however the
    partitions interleave. Equal ts: the lower partition wins."""
    original = steady("d", 30, users=("a",))
    copies = [{**e, "user_id": "d-b", "ts": e["ts"] + shift} for e in original]
    logs = {0: original, 1: copies}
    outcomes = [run(logs, seed=seed, poll=poll) for seed, poll in ((None, 50), (1, 3), (2, 11))]
    for got in outcomes[1:]:
        assert states_equal(got.samples, outcomes[0].samples) and got.dead() == outcomes[0].dead()
    got = outcomes[0]
    s = got.samples
    exposures = [e for e in original if e["type"] == "exposure"]
    assert sorted(s["sample_id"].tolist()) == sorted(hash_id(e["event_id"]) for e in exposures)  # once each
    assert set(s["partition"].tolist()) == {winner} and set(s["user"].tolist()) == {hash_id(("d-a", "d-b")[winner])}
    loser = 1 - winner
    assert got.dead() == {(loser, offset): "duplicate_event_id" for offset in range(len(logs[loser]))}
    clicked = {hash_id(e["event_id"].replace("c", "x")) for e in original if e["type"] == "click"}
    assert {sid for sid, c in zip(s["sample_id"].tolist(), s["click"]) if c} == clicked  # the winner's own clicks


def test_a_retry_its_partition_window_forgot_is_counted_not_dead_lettered() -> None:
    log = [ev(f"x{i}", "exposure", T0 + 500 * i, user="a", request=f"r{i}") for i in range(N)]
    logs = {0: [*log, log[0]]}  # the retry arrives after the 2-id window forgot it
    got = run(logs, cfg=CFG.model_copy(update={"dedupe_window": 2}))
    assert got.dlq == [] and got.counters["duplicates"] == 1
    assert sorted(got.samples["sample_id"].tolist()) == sorted(hash_id(e["event_id"]) for e in log)


# ------------------------------------------------------------------ 3. labels join the same user only
def test_a_label_carrying_another_users_id_is_dead_lettered_and_never_joins() -> None:
    a = [ev("xa", "exposure", T0 + 10_000, user="a", request="r1", item="i1"),
         ev("xa2", "exposure", T0 + 10_100, user="a", request="r2", item="i2"),
         ev("ca2", "click", T0 + 11_000, user="a", request="r2", item="i2")]
    b = [ev("cb", "click", T0 + 10_500, user="b", request="r1", item="i1"),  # a's exposure
         ev("cb9", "click", T0 + 10_600, user="b", request="r9", item="i1"),  # nobody's
         ev("vb", "convert", T0 + 12_000, user="b", request="r2", item="i2")]  # a's clicked exposure
    logs = {0: [*steady("p", 8), *a], 1: [*steady("q", 8), *b]}
    got = run(logs)
    labels = got.labels(logs)
    assert labels["xa"] == (0, 0) and labels["xa2"] == (1, 0)
    assert {k: v for k, v in got.dead_ids().items() if k in {"cb", "cb9", "vb"}} == {
        "cb": "label_user_mismatch", "cb9": "orphan_click", "vb": "label_user_mismatch"}


def test_users_sharing_a_request_id_each_join_their_own_exposure() -> None:
    a = [ev("xa", "exposure", T0 + 10_000, user="a"), ev("ca", "click", T0 + 15_000, user="a")]
    b = [ev("xb", "exposure", T0 + 10_000, user="b"), ev("cb", "click", T0 + 11_000, user="b"),
         ev("vb", "convert", T0 + 12_000, user="b")]
    logs = {0: [*steady("p", 8), *a], 1: [*steady("q", 8), *b]}
    got = run(logs)
    assert got.labels(logs)["xa"] == (1, 0) and got.labels(logs)["xb"] == (1, 1)
    assert not set(got.dead_ids()) & {"ca", "cb", "vb"}


@pytest.mark.parametrize("shift,kept", [(500, "x1"), (-500, "x1-again")])
def test_a_resent_exposure_is_dead_lettered_and_labels_join_the_canonical_first(shift: int, kept: str) -> None:
    """A request shows an item to a user once: a second exposure of the same request x item x
    user under a new event_id is a re-send. The one first in canonical order stays."""
    x1 = ev("x1", "exposure", T0 + 10_000, user="a")
    resent = {**x1, "event_id": "x1-again", "ts": x1["ts"] + shift}
    logs = {0: [*steady("p", 8), x1, resent, ev("c1", "click", T0 + 11_000, user="a")]}
    got = run(logs)
    labels = got.labels(logs)
    assert labels[kept] == (1, 0) and {"x1", "x1-again"} - {kept} <= set(got.dead_ids())
    assert got.dead_ids() == {({"x1", "x1-again"} - {kept}).pop(): "duplicate_exposure"}


# ------------------------------------------------------------------ properties
@st.composite
def clean_logs(draw: st.DrawFn, max_requests: int = 10) -> dict[int, list[dict[str, Any]]]:
    """1-3 partitions with their own users; requests of one exposure, clicks some seconds later."""
    logs: dict[int, list[dict[str, Any]]] = {}
    for p in range(draw(st.integers(1, 3))):
        events = []
        ts = T0
        for r in range(draw(st.integers(1, max_requests))):
            ts += draw(st.integers(0, 3_000))
            base = {"user_id": f"p{p}u{draw(st.integers(0, 1))}", "item_id": f"i{draw(st.integers(0, 3))}",
                    "request_id": f"p{p}r{r}"}
            events.append({"event_id": f"p{p}x{r}", "type": "exposure", "ts": ts, **base})
            if draw(st.booleans()):
                events.append({"event_id": f"p{p}c{r}", "type": "click", "ts": ts + draw(st.integers(0, 40_000)), **base})
        logs[p] = sorted(events, key=lambda e: e["ts"])
    return logs


@st.composite
def hostile_logs(draw: st.DrawFn) -> dict[int, list[dict[str, Any]]]:
    """Clean logs plus, at random places: far-future events, event ids copied from another
    partition, clicks carrying this partition's user for another's exposure, re-sent exposures."""
    logs = draw(clean_logs())
    everything = [e for log in logs.values() for e in log]
    exposures = [e for e in everything if e["type"] == "exposure"]
    for k in range(draw(st.integers(1, 6))):
        p = draw(st.sampled_from(sorted(logs)))
        user = f"p{p}u0"
        src = draw(st.sampled_from(exposures))
        jitter = draw(st.integers(-1_000, 1_000))
        kind = draw(st.sampled_from(["future", "copied_id", "foreign_click", "resent"]))
        if kind == "future":
            extra = ev(f"far{k}", "exposure", draw(st.integers(T0 + DAY, Y2099)), user=user, request=f"far{k}")
        elif kind == "copied_id":
            extra = {**draw(st.sampled_from(everything)), "user_id": user}
        elif kind == "foreign_click":
            extra = {**src, "event_id": f"foreign{k}", "type": "click", "user_id": user, "ts": src["ts"] + abs(jitter)}
        else:
            extra = {**src, "event_id": f"again{k}", "ts": src["ts"] + jitter}
        logs[p].insert(draw(st.integers(0, len(logs[p]))), extra)
    return logs


def dead_letters(dlq: Sequence[Rejection]) -> list[tuple[str, int, int]]:
    return sorted((r.reason.value, r.partition, r.offset) for r in dlq)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logs=hostile_logs(), seed=st.integers(0, 2**16), poll=st.integers(1, 40), restart=st.integers(0, 12))
def test_hostile_output_is_the_same_for_any_interleaving_batching_and_restart(
        logs: dict[int, list[dict[str, Any]]], seed: int, poll: int, restart: int) -> None:
    reference = run(logs, poll=1000)
    first = make_pipeline(logs, seed=seed)
    before: list[SampleBatch] = []
    for _ in range(restart):
        before += first.poll(poll)
    first_dlq: Any = first.dlq
    dead_before = list(first_dlq.rejections)
    second = make_pipeline(logs, seed=seed + 1)
    restore_pipeline(second, through_npz(pipeline_checkpoint(first)))
    after = run(logs, poll=poll, pipeline=second)
    assert states_equal(joined([*before, *after.batches]), reference.samples)
    assert dead_letters(dead_before + after.dlq) == dead_letters(reference.dlq)
    sample_ids = reference.samples["sample_id"].tolist()
    assert len(sample_ids) == len(set(sample_ids))  # ids unique across the topic, re-sends dropped


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), logs=clean_logs(max_requests=14))
def test_a_single_far_future_event_never_changes_which_valid_events_are_accepted(
        data: st.DataObject, logs: dict[int, list[dict[str, Any]]]) -> None:
    """The far event has at least one valid event after it: what tells it from the last
    event of a sparse log (with nothing after it, end of input admits it:
    tests/test_joiner_sparse.py)."""
    p = data.draw(st.sampled_from(sorted(logs)))
    top = max(e["ts"] for log in logs.values() for e in log)
    far = ev("far", data.draw(st.sampled_from(["exposure", "click"])),
             data.draw(st.integers(top + CFG.max_future_ms + 1, Y2099)), user=f"p{p}u0", request=f"p{p}r0")
    hostile = {q: list(log) for q, log in logs.items()}
    hostile[p].insert(data.draw(st.integers(0, len(logs[p]) - 1)), far)
    seed = data.draw(st.integers(0, 2**16))
    clean, got = run(logs, seed=seed), run(hostile, seed=seed + 1)
    assert states_equal(without_ledger(got.samples), without_ledger(clean.samples))
    assert got.dead_ids() == {**clean.dead_ids(), "far": "ts_ahead"}
