"""Hostile input through the real embedded broker and the real pipeline
(``consumers.runtime.build_pipeline``): a bad producer clock (DESIGN §6.6), event ids
reused across partitions, labels carrying another user's id and re-sent exposures
(§6.7). Messages go to explicit partitions with explicit keys: nothing here depends on
the partitioner or on timing. Each test failed on the joiner before the guard."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from consumers.config import IngestConfig, JoinerConfig
from consumers.pipeline import IngestPipeline
from consumers.runtime import build_pipeline, make_producer
from consumers.schema import SampleBatch, concat_batches, hash_id
from consumers.state import flatten_state, states_equal, unflatten_state
from consumers.testing import BatchedPipeline, reference_labels
from test_consumers_kafka import read_topic, source_config

pytestmark = pytest.mark.integration

T0 = 1_767_225_600_000
Y2099 = 4_070_908_800_000
DAY = 86_400_000
# The clock guard at its defaults (max_future_ms 30 min, confirm_events 32).
JOINER = JoinerConfig(click_window_ms=20_000, convert_window_ms=60_000, allowed_lateness_ms=1_000,
                      stats_refresh_ms=30_000, history_len=8, num_random_negatives=2)

Logs = dict[int, list[dict[str, Any]]]


def ev(eid: str, kind: str, ts: int, user: str, item: str = "i1", request: str = "r1") -> dict[str, Any]:
    return {"event_id": eid, "type": kind, "ts": ts, "user_id": user, "item_id": item, "request_id": request}


def steady(prefix: str, n: int, users: Sequence[str], start: int = T0) -> list[dict[str, Any]]:
    """``n`` exposures a second apart (users in turn), every third clicked 400 ms later."""
    out = []
    for i in range(n):
        user, ts = users[i % len(users)], start + i * 1000
        out.append(ev(f"{prefix}x{i}", "exposure", ts, user, item=f"i{i % 7}", request=f"{prefix}r{i}"))
        if i % 3 == 0:
            out.append(ev(f"{prefix}c{i}", "click", ts + 400, user, item=f"i{i % 7}", request=f"{prefix}r{i}"))
    return sorted(out, key=lambda e: e["ts"])


def produce_logs(bootstrap: str, topic: str, logs: Logs) -> int:
    """Each partition's log, in order, to that partition explicitly, keyed by user."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    n = 0
    for partition, log in sorted(logs.items()):
        for e in log:
            producer.produce(topic, value=orjson.dumps(e), key=str(e["user_id"]).encode(), partition=partition)
            n += 1
        producer.poll(0)
    assert producer.flush(30) == 0
    return n


def kafka_pipeline(bootstrap: str, topic: str) -> IngestPipeline:
    config = IngestConfig(source=source_config(bootstrap, topic), joiner=JOINER, dlq_topic=f"{topic}.dlq")
    return build_pipeline(config, make_producer(config))


def consume(pipeline: IngestPipeline | BatchedPipeline, total: int, flush: bool = True,
            timeout_s: float = 60.0) -> list[SampleBatch]:
    inner = pipeline.pipeline if isinstance(pipeline, BatchedPipeline) else pipeline
    batches: list[SampleBatch] = []
    deadline = time.monotonic() + timeout_s
    while inner.stats["messages"] < total and time.monotonic() < deadline:
        batches += pipeline.poll(500, 0.2)
    assert inner.stats["messages"] == total
    return batches + (pipeline.flush() if flush else [])


def dead_letters(bootstrap: str, topic: str, pipeline: IngestPipeline) -> list[dict[str, Any]]:
    """The DLQ topic's records (after ``pipeline.close()``), checked against the counters."""
    expected = sum(pipeline.dlq_counts.values())
    records = [orjson.loads(m.value()) for m in read_topic(bootstrap, f"{topic}.dlq", expected)]
    assert Counter(r["reason"] for r in records) == {k: v for k, v in pipeline.dlq_counts.items() if v}
    return records


def event_id(record: dict[str, Any]) -> str:
    return orjson.loads(record["original"])["event_id"]


def labels_of(samples: SampleBatch) -> dict[int, tuple[int, int]]:
    return {sid: (int(c), int(v)) for sid, c, v in zip(samples["sample_id"].tolist(), samples["click"], samples["convert"])}


def run_topic(broker: Any, topic: str, logs: Logs) -> tuple[SampleBatch, list[dict[str, Any]], IngestPipeline]:
    broker.create_topics([topic, f"{topic}.dlq"], partitions=len(logs))
    total = produce_logs(broker.bootstrap_servers, topic, logs)
    pipeline = kafka_pipeline(broker.bootstrap_servers, topic)
    try:
        samples = concat_batches(consume(pipeline, total))
    finally:
        assert pipeline.close() == 0
    return samples, dead_letters(broker.bootstrap_servers, topic, pipeline), pipeline


def test_far_future_events_cost_a_dlq_record_each_and_no_valid_event(broker: Any, unique_name: str) -> None:
    """Partition 0 gets a 2099 event and one two days ahead mid-stream; partition 1 starts
    with a 2099 event. The joiner used to trust each: every later event of the partition
    was dead-lettered ``too_late``."""
    p0, p1 = steady("a", 70, ("a1", "a2")), steady("b", 70, ("b1", "b2"))
    bad = [ev("bad-2099", "exposure", Y2099, "a1", request="bad1"), ev("bad-2days", "exposure", T0 + 2 * DAY, "a2", request="bad2"),
           ev("bad-first", "exposure", Y2099, "b1", request="bad3")]
    logs = {0: [*p0[:20], bad[0], *p0[20:50], bad[1], *p0[50:]], 1: [bad[2], *p1]}
    samples, records, pipeline = run_topic(broker, unique_name, logs)
    valid = p0 + p1
    assert labels_of(samples) == reference_labels(valid, JOINER)  # every valid exposure, right labels
    assert sorted((r["reason"], event_id(r)) for r in records) == sorted(("ts_ahead", e["event_id"]) for e in bad)
    assert pipeline.counters["dlq.too_late"] == 0


def test_an_event_id_on_two_partitions_makes_one_sample(broker: Any, unique_name: str) -> None:
    """The same 40 event ids under another user (so another partition): the joiner used to
    make a sample from each copy — 30 duplicate sample_ids."""
    original = steady("d", 30, ("d1",))
    copies = [{**e, "user_id": "d2"} for e in original]
    samples, records, _ = run_topic(broker, unique_name, {0: original, 1: copies})
    ids = samples["sample_id"].tolist()
    assert len(ids) == len(set(ids)) == 30
    assert labels_of(samples) == reference_labels(original, JOINER) and set(samples["user"].tolist()) == {hash_id("d1")}
    assert sorted((r["reason"], r["partition"]) for r in records) == [("duplicate_event_id", 1)] * len(copies)


def test_labels_of_another_user_and_resent_exposures_are_dead_lettered(broker: Any, unique_name: str) -> None:
    """User b clicks and converts on user a's (request_id, item_id); a's exposures are
    re-sent under new event ids. The joiner used to flip a's labels and sample re-sends."""
    a = steady("a", 40, ("a1",))
    a_exposures = [e for e in a if e["type"] == "exposure"]
    resent = [{**e, "event_id": f"{e['event_id']}-again", "ts": e["ts"] + 200} for e in a_exposures[::4]]
    foreign = [ev(f"b-click{i}", "click", e["ts"] + 300, "b1", e["item_id"], e["request_id"]) for i, e in enumerate(a_exposures[1::3])]
    foreign += [ev(f"b-conv{i}", "convert", e["ts"] + 900, "b1", e["item_id"], e["request_id"]) for i, e in enumerate(a_exposures[::3])]
    b = sorted([*steady("b", 40, ("b1",)), *foreign], key=lambda e: e["ts"])
    logs = {0: sorted([*a, *resent], key=lambda e: e["ts"]), 1: b}
    samples, records, _ = run_topic(broker, unique_name, logs)
    assert labels_of(samples) == reference_labels(a + steady("b", 40, ("b1",)), JOINER)
    reasons = Counter((r["reason"], event_id(r).split("-")[-1].rstrip("0123456789")) for r in records)
    assert reasons == {("label_user_mismatch", "click"): len(a_exposures[1::3]),
                       ("label_user_mismatch", "conv"): len(a_exposures[::3]),
                       ("duplicate_exposure", "again"): len(resent)}


def test_a_restart_while_events_are_quarantined_reproduces_the_batches(broker: Any, unique_name: str) -> None:
    """State + positions taken while partitions hold events (their first events, a 2099 event,
    a confirmed jump), restored into a fresh consumer: the uninterrupted batches, and no
    valid event lost."""
    p0 = [*steady("a", 40, ("a1", "a2")), ev("bad", "exposure", Y2099, "a1", request="bad"), *steady("a2", 40, ("a1", "a2"), T0 + 60_000)]
    p1 = [*steady("b", 40, ("b1",)), *steady("b2", 60, ("b1",), start=T0 + DAY)]
    broker.create_topics([unique_name, f"{unique_name}.dlq"], partitions=2)
    total = produce_logs(broker.bootstrap_servers, unique_name, {0: p0, 1: p1})
    uninterrupted = BatchedPipeline(kafka_pipeline(broker.bootstrap_servers, unique_name), 16)
    try:
        reference = consume(uninterrupted, total)
    finally:
        uninterrupted.pipeline.close()
    valid = [e for e in p0 + p1 if e["event_id"] != "bad"]
    assert labels_of(concat_batches(reference)) == reference_labels(valid, JOINER)
    first = BatchedPipeline(kafka_pipeline(broker.bootstrap_servers, unique_name), 16)
    inner = first.pipeline
    before: list[SampleBatch] = []
    try:
        while (inner.joiner.quarantined == 0 or inner.stats["messages"] < total // 2) and inner.stats["messages"] < total:
            before += first.poll(7, 0.2)
        assert inner.joiner.quarantined > 0
        doc, arrays = flatten_state(first.state_dict())
        first.poll(7, 0.2)  # consumed after the checkpoint: lost in the crash, re-read after it
    finally:
        inner.close()
    second = BatchedPipeline(kafka_pipeline(broker.bootstrap_servers, unique_name), 16)
    try:
        second.load_state_dict(unflatten_state(orjson.loads(orjson.dumps(doc)), arrays))
        after = consume(second, total)
    finally:
        second.pipeline.close()
    resumed = before + after
    assert len(resumed) == len(reference) and all(states_equal(x, y) for x, y in zip(resumed, reference))
    counters = second.pipeline.counters
    assert counters["dlq.ts_ahead"] == 1 and counters["state_repairs"] == 0
