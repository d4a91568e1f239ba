"""The label joiner as pure logic: labels, windows, policies, watermarks, caps, state,
and the properties (no leakage, order/duplicate/batching invariance) with hypothesis."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.config import DecoderConfig, JoinerConfig, PopularityConfig
from consumers.decode import EventDecoder
from consumers.joiner import LabelJoiner
from consumers.popularity import InProcessPopularity
from consumers.reasons import Reason, Rejection
from consumers.schema import SampleBatch, concat_batches, empty_batch, hash_id, validate_batch
from consumers.state import flatten_state, states_equal, unflatten_state
from consumers.testing import StreamSpec, partition_of, reference_joins, reference_labels, synthetic_events

T0 = 1_767_225_600_000
CFG = JoinerConfig(click_window_ms=30_000, convert_window_ms=60_000, allowed_lateness_ms=2_000,
                   stats_refresh_ms=20_000, history_len=8, num_random_negatives=3)


def make_joiner(cfg: JoinerConfig = CFG) -> LabelJoiner:
    return LabelJoiner(cfg, InProcessPopularity(PopularityConfig()))


class Run:
    """Feed events (dicts or raw bytes) through decoder + joiner in arrival order."""

    def __init__(self, cfg: JoinerConfig = CFG, partitions: int = 1) -> None:
        self.cfg = cfg
        self.partitions = partitions
        self.decoder = EventDecoder(DecoderConfig(), cfg.sparse_features, cfg.dense_features)
        self.joiner = make_joiner(cfg)
        self.joiner.assign(list(range(partitions)))
        self.next_offset = [0] * partitions
        self.batches: list[SampleBatch] = []
        self.rejections: list[Rejection] = []

    def feed(self, events: Sequence[dict[str, Any]], chunk: int = 50) -> "Run":
        for start in range(0, len(events), chunk):
            values, parts, offsets = [], [], []
            for e in events[start:start + chunk]:
                p = partition_of(str(e["user_id"]), self.partitions)
                values.append(orjson.dumps(e))
                parts.append(p)
                offsets.append(self.next_offset[p])
                self.next_offset[p] += 1
            decoded = self.decoder.decode(values, parts, offsets)
            assert decoded.rejections == []
            self.rejections += self.joiner.ingest(decoded.events)
            self._take(self.joiner.advance())
        return self

    def flush(self) -> "Run":
        self._take(self.joiner.flush())
        return self

    def _take(self, emission: Any) -> None:
        validate_batch(emission.samples)
        self.batches.append(emission.samples)
        self.rejections += emission.rejections

    @property
    def samples(self) -> SampleBatch:
        return concat_batches([empty_batch(self.cfg.history_len, self.cfg.num_random_negatives,
                                           len(self.cfg.sparse_features), len(self.cfg.dense_features)), *self.batches])

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rejections:
            out[r.reason.value] = out.get(r.reason.value, 0) + 1
        return out


def ev(eid: str, kind: str, ts: int, user: str = "u1", item: str = "i1", request: str = "r1") -> dict[str, Any]:
    return {"event_id": eid, "type": kind, "ts": ts, "user_id": user, "item_id": item, "request_id": request}


def labelled_stream(seed: int = 0, exposures: int = 1500) -> list[dict[str, Any]]:
    spec = StreamSpec(exposures=exposures, users=40, items=300, request_gap_ms=300, click_rate=0.25, convert_rate=0.4,
                      click_delay_ms=(0, 40_000), convert_delay_ms=(0, 80_000), seed=seed)
    return synthetic_events(spec)


# ------------------------------------------------------------------ labels and windows
@pytest.mark.parametrize("partitions", [1, 3])
def test_wait_policy_labels_match_the_reference(partitions: int) -> None:
    events = labelled_stream()
    run = Run(partitions=partitions).feed(events).flush()
    s = run.samples
    expected = reference_labels(events, CFG)
    assert sorted(s["sample_id"].tolist()) == sorted(expected)  # every exposure exactly once
    got = {sid: (int(c), int(v)) for sid, c, v in zip(s["sample_id"].tolist(), s["click"], s["convert"])}
    assert got == expected
    assert sum(c for c, _ in expected.values()) > 50 and sum(v for _, v in expected.values()) > 10
    assert not s["is_correction"].any()
    assert run.reasons()["orphan_click"] > 0  # clicks up to 40 s after a 30 s window: closed by then


def test_emit_then_correct_emits_early_and_corrects_late_conversions() -> None:
    cfg = CFG.model_copy(update={"policy": "emit_then_correct"})
    events = labelled_stream(seed=1)
    run = Run(cfg).feed(events).flush()
    s = run.samples
    first = ~s["is_correction"]
    expected = reference_labels(events, cfg)
    assert sorted(s["sample_id"][first].tolist()) == sorted(expected)
    final = {sid: (int(c), int(v)) for sid, c, v in zip(s["sample_id"][first].tolist(), s["click"][first], s["convert"][first])}
    position = {sid: i for i, sid in enumerate(s["sample_id"].tolist()) if not s["is_correction"][i]}
    corrections = np.flatnonzero(s["is_correction"])
    assert len(corrections) > 0
    for i in corrections.tolist():
        sid = int(s["sample_id"][i])
        assert final[sid] == (1, 0) and position[sid] < i  # corrects an earlier convert=0 emission
        assert (s["click"][i], s["convert"][i]) == (1, 1)
        final[sid] = (1, 1)
    assert final == expected


def test_window_edges_and_orphans() -> None:
    cw, cvw = CFG.click_window_ms, CFG.convert_window_ms
    events = [
        ev("x1", "exposure", T0, request="a"),
        ev("c1", "click", T0 + cw, request="a"),  # last instant of the click window
        ev("c1b", "click", T0 + cw + 1, request="a"),  # a repeat click: exposure open (waits for conversion)
        ev("v1", "convert", T0 + cw + cvw, request="a"),  # last instant of the convert window
        ev("x2", "exposure", T0, request="b"),
        ev("c2", "click", T0 + cw + 1, request="b"),  # 1 ms late
        ev("x3", "exposure", T0 + 10, request="c"),
        ev("v3", "convert", T0 + 20, request="c"),  # no click
        ev("c3", "click", T0 + 30, request="c"),
        ev("v3b", "convert", T0 + 30 + cvw + 1, request="c"),  # 1 ms after the convert window
        ev("c4", "click", T0 + 40, request="nope"),
        ev("v4", "convert", T0 + 50, request="nope"),
        ev("x5", "exposure", T0 + 100, request="e"),
        ev("c5", "click", T0 + 99, request="e"),  # before its exposure
    ]
    run = Run().feed(sorted(events, key=lambda e: e["ts"])).flush()
    labels = {sid: (int(c), int(v)) for sid, c, v in zip(run.samples["sample_id"].tolist(), run.samples["click"], run.samples["convert"])}
    assert labels == {hash_id("x1"): (1, 1), hash_id("x2"): (0, 0), hash_id("x3"): (1, 0), hash_id("x5"): (0, 0)}
    rejected = {orjson.loads(r.original)["event_id"]: r.reason for r in run.rejections}
    # c2/v3b come after their exposure closed (in event time): orphans, like c5 (before its exposure)
    assert rejected == {"c2": Reason.ORPHAN_CLICK, "v3": Reason.CONVERT_WITHOUT_CLICK, "v3b": Reason.ORPHAN_CONVERT,
                        "c4": Reason.ORPHAN_CLICK, "v4": Reason.ORPHAN_CONVERT, "c5": Reason.ORPHAN_CLICK,
                        "c1b": Reason.CLICK_OUTSIDE_WINDOW}
    assert reference_labels(events, CFG) == labels


def test_too_late_events_are_rejected_and_never_sampled() -> None:
    run = Run().feed([ev("x1", "exposure", T0, request="a"), ev("x2", "exposure", T0 + 60_000, request="b")])
    run.feed([ev("late", "exposure", T0 + 60_000 - CFG.allowed_lateness_ms - 1, request="c"),
              ev("ok", "exposure", T0 + 60_000 - CFG.allowed_lateness_ms, request="d")]).flush()
    assert [r.reason for r in run.rejections] == [Reason.TOO_LATE]
    assert orjson.loads(run.rejections[0].original)["event_id"] == "late"
    assert sorted(run.samples["sample_id"].tolist()) == sorted(hash_id(e) for e in ("x1", "x2", "ok"))


def test_emission_order_is_emit_time_then_ts_then_sample_id() -> None:
    events = labelled_stream(seed=2)
    run = Run(partitions=2).feed(events).flush()
    joins = reference_joins(events, CFG)
    s = run.samples
    keys = []
    for sid, ts in zip(s["sample_id"].tolist(), s["ts"].tolist()):
        click_ts = joins[sid][2]
        emit_at = ts + CFG.click_window_ms if click_ts is None else click_ts + CFG.convert_window_ms
        keys.append((emit_at, ts, sid))
    assert keys == sorted(keys)  # across all batches: one globally sorted sequence


# ------------------------------------------------------------------ watermark and partitions
def test_watermark_is_the_minimum_over_assigned_partitions() -> None:
    run = Run(partitions=2)
    n = CFG.confirm_events  # a partition's time counts once that many consistent events anchored it
    fast = [ev(f"f{i}", "exposure", T0 + i * 10_000, user="fast", request=f"f{i}") for i in range(n + 8)]
    fast_top = T0 + (n + 7) * 10_000
    p_fast = partition_of("fast", 2)
    slow_user = next(f"s{i}" for i in range(100) if partition_of(f"s{i}", 2) != p_fast)
    run.feed(fast)
    assert run.joiner.watermark < T0  # the other partition has seen nothing: hold everything
    assert run.joiner.partition_watermarks == {p_fast: fast_top - CFG.allowed_lateness_ms, 1 - p_fast: None}
    assert len(run.samples["sample_id"]) == 0 and run.joiner.pending == 0 and run.joiner.buffered == len(fast)
    slow = [ev(f"s{i}", "exposure", T0 + 100_000, user=slow_user, request=f"s{i}") for i in range(n)]
    run.feed(slow[:-1])
    assert run.joiner.partition_watermarks[1 - p_fast] is None  # its first events alone do not anchor it
    run.feed(slow[-1:])
    expected_wm = T0 + 100_000 - CFG.allowed_lateness_ms
    assert run.joiner.watermark == expected_wm
    emitted = run.samples["ts"]
    assert len(emitted) > 0 and (emitted + CFG.click_window_ms < expected_wm).all()
    run.joiner.revoke([1 - p_fast])  # the slow partition goes away: the fast one alone decides
    run._take(run.joiner.advance())
    assert run.joiner.watermark == fast_top - CFG.allowed_lateness_ms


def test_pending_cap_forces_the_oldest_out_once() -> None:
    cfg = CFG.model_copy(update={"max_pending_samples": 10})
    events = labelled_stream(seed=3, exposures=300)
    run = Run(cfg).feed(events, chunk=20).flush()
    assert run.joiner.counters["forced_emissions"] > 0
    assert sorted(run.samples["sample_id"].tolist()) == sorted(reference_labels(events, cfg))


def test_buffer_cap_forces_the_watermark_on() -> None:
    cfg = CFG.model_copy(update={"max_buffered_events": 5})
    run = Run(cfg, partitions=2)  # one partition stays silent: only the cap can move the watermark
    user = next(f"u{i}" for i in range(100) if partition_of(f"u{i}", 2) == 0)
    run.feed([ev(f"x{i}", "exposure", T0 + i * 1000, user=user, request=f"r{i}") for i in range(100)], chunk=10)
    assert run.joiner.counters["forced_watermark_advances"] > 0
    assert run.joiner.buffered <= 10
    assert len(run.samples["sample_id"]) > 0


# ------------------------------------------------------------------ state
def _through_npz(state: dict[str, Any]) -> dict[str, Any]:
    doc, arrays = flatten_state(state)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as loaded:
        restored = {k: loaded[k] for k in loaded.files}
    return unflatten_state(orjson.loads(orjson.dumps(doc)), restored)


@pytest.mark.parametrize("policy", ["wait", "emit_then_correct"])
def test_state_round_trip_mid_stream_gives_identical_output(policy: str) -> None:
    cfg = CFG.model_copy(update={"policy": policy})
    events = labelled_stream(seed=4)
    half = len(events) // 2
    whole = Run(cfg, partitions=2).feed(events).flush().samples

    first = Run(cfg, partitions=2).feed(events[:half])
    state = first.joiner.state_dict()
    frozen = _through_npz(state)
    before, offsets = first.samples, list(first.next_offset)
    first.feed(events[half:half + 100])  # keep going: the returned state must be a copy
    assert states_equal(state, frozen)

    second = Run(cfg, partitions=2)
    second.joiner.load_state_dict(frozen)
    second.next_offset = offsets
    second.feed(events[half:], chunk=37).flush()
    assert states_equal(concat_batches([before, second.samples]), whole)
    assert states_equal(second.joiner.state_dict(), Run(cfg, partitions=2).feed(events).flush().joiner.state_dict())


def test_state_does_not_depend_on_how_partitions_interleave() -> None:
    """The same messages per partition, consumed with the partitions interleaved two ways (as
    fetches land) and cut into different polls, leave the same state -- staged events
    included (a chaos run once ended with two staged events in swapped order)."""
    cfg = CFG.model_copy(update={"policy": "emit_then_correct"})
    events = labelled_stream(seed=4)[:700]
    one_partition_then_the_other = sorted(events, key=lambda e: partition_of(str(e["user_id"]), 2))  # stable
    a = Run(cfg, partitions=2).feed(events, chunk=5).joiner
    b = Run(cfg, partitions=2).feed(one_partition_then_the_other, chunk=37).joiner
    assert a.buffered > 0  # events are staged at the end: the case that differed
    assert states_equal(a.state_dict(), b.state_dict())


# ------------------------------------------------------------------ properties
def _canonical(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {"exposure": 1, "click": 2, "convert": 3}
    return sorted(events, key=lambda e: (e["ts"], rank[e["type"]], hash_id(e["event_id"])))


@st.composite
def small_streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A few users and items, requests with exposures, clicks/conversions at random delays."""
    n = draw(st.integers(1, 25))
    events = []
    ts = T0
    for r in range(n):
        ts += draw(st.integers(0, 6_000))
        user = f"u{draw(st.integers(0, 2))}"
        items = draw(st.sets(st.integers(0, 4), min_size=1, max_size=3))
        for item in sorted(items):
            base = {"user_id": user, "item_id": f"i{item}", "request_id": f"r{r}"}
            events.append({"event_id": f"x{r}-{item}", "type": "exposure", "ts": ts, **base})
            if draw(st.booleans()):
                click_ts = ts + draw(st.integers(-1_000, 40_000))
                events.append({"event_id": f"c{r}-{item}", "type": "click", "ts": click_ts, **base})
                if draw(st.booleans()):
                    events.append({"event_id": f"v{r}-{item}", "type": "convert",
                                   "ts": click_ts + draw(st.integers(-1_000, 70_000)), **base})
    return sorted(events, key=lambda e: e["ts"])


@st.composite
def disordered(draw: st.DrawFn, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The same events delivered out of order within the lateness, with duplicates:
    arrival order = ts + jitter with jitter in [0, lateness], so nothing is too late."""
    lateness = CFG.allowed_lateness_ms
    copies = [(e["ts"] + draw(st.integers(0, lateness)), i, e) for i, e in enumerate(events)]
    for i, e in enumerate(events):
        if draw(st.integers(0, 4)) == 0:
            copies.append((e["ts"] + draw(st.integers(0, lateness)), len(events) + i, e))
    return [e for _, _, e in sorted(copies, key=lambda c: (c[0], c[1]))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), events=small_streams(), partitions=st.integers(1, 3), chunk=st.integers(1, 40),
       policy=st.sampled_from(["wait", "emit_then_correct"]))
def test_disorder_duplicates_and_batching_do_not_change_the_samples(data: st.DataObject, events: list[dict[str, Any]],
                                                                     partitions: int, chunk: int, policy: str) -> None:
    cfg = CFG.model_copy(update={"policy": policy})
    ordered = Run(cfg, partitions).feed(events, chunk=len(events)).flush()
    arrivals = data.draw(disordered(events))
    shuffled = Run(cfg, partitions).feed(arrivals, chunk=chunk).flush()
    # same rows in the same order; only the ledger (where the exposure sat in the log) moved
    ledger = ("partition", "offset")
    assert states_equal({k: v for k, v in shuffled.samples.items() if k not in ledger},
                        {k: v for k, v in ordered.samples.items() if k not in ledger})
    assert shuffled.joiner.counters["duplicates"] == len(arrivals) - len(events)
    assert sorted(r.reason for r in shuffled.rejections) == sorted(r.reason for r in ordered.rejections)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), events=small_streams())
def test_history_is_exactly_the_strict_prefix(data: st.DataObject, events: list[dict[str, Any]]) -> None:
    """No leakage: each sample's history is the user's last L accepted events with
    ts strictly before the exposure — recomputed here by brute force."""
    run = Run().feed(data.draw(disordered(events)), chunk=7).flush()
    rejected = {orjson.loads(r.original)["event_id"] for r in run.rejections}
    accepted = _canonical([e for e in events if e["event_id"] not in rejected])
    L = CFG.history_len
    s = run.samples
    assert (np.where(s["hist_actions"] > 0, s["hist_ts"], np.iinfo(np.int64).min) < s["ts"][:, None]).all()
    by_id = {hash_id(e["event_id"]): e for e in accepted}
    codes = {"exposure": 1, "click": 2, "convert": 3}
    for i, sid in enumerate(s["sample_id"].tolist()):
        x = by_id[sid]
        prefix = [e for e in accepted if e["user_id"] == x["user_id"] and e["ts"] < x["ts"]][-L:]
        pad = L - len(prefix)
        assert s["hist_len"][i] == len(prefix)
        assert s["hist_ts"][i].tolist() == [0] * pad + [e["ts"] for e in prefix]
        assert s["hist_items"][i].tolist() == [0] * pad + [hash_id(e["item_id"]) for e in prefix]
        assert s["hist_actions"][i].tolist() == [0] * pad + [codes[e["type"]] for e in prefix]
        assert (s["gap_bucket"][i] == 0) == (len(prefix) == 0)
        package = set(s["rank_package"][i].tolist()) - {0}
        assert package <= {hash_id(e["item_id"]) for e in prefix} - {hash_id(x["item_id"])}
