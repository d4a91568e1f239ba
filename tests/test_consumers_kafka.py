"""The Kafka path against the embedded broker: source offsets/seek/rebalance/stall,
labels end to end, a 10,000-message malformed flood into the DLQ topic, run_join."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from consumers.arrow_io import ipc_to_batch
from consumers.config import DecoderConfig, IngestConfig, JoinerConfig, KafkaSourceConfig
from consumers.decode import EventDecoder
from consumers.reasons import Reason
from consumers.runtime import build_pipeline, make_producer, run_join
from consumers.schema import SampleBatch, concat_batches, hash_id
from consumers.source import KafkaSource
from consumers.state import flatten_state, states_equal, unflatten_state
from consumers.testing import BatchedPipeline, StreamSpec, reference_labels, synthetic_events

pytestmark = pytest.mark.integration

JOINER = JoinerConfig(click_window_ms=20_000, convert_window_ms=60_000, allowed_lateness_ms=1_000,
                      stats_refresh_ms=30_000, history_len=8, num_random_negatives=2)


def produce(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes | None]],
            partitions: int | None = None) -> int:
    """Produce ``(key, value)`` messages. With ``partitions``, message ``i`` goes to partition
    ``i % partitions`` explicitly: a test that needs messages in every partition must not leave
    that to the partitioner (librdkafka's sticky partitioner puts a burst of null-key
    messages into one partition)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    n = 0
    for i, (key, value) in enumerate(messages):
        placed = {} if partitions is None else {"partition": i % partitions}
        while True:
            try:
                producer.produce(topic, key=key, value=value, **placed)
                break
            except BufferError:
                producer.poll(0.05)
        n += 1
    assert producer.flush(30) == 0
    return n


def produce_to_partitions(producer: Producer, topic: str, values: dict[int, list[bytes | None]]) -> None:
    """Produce each partition's values into that partition, explicitly (key ``b"k"``, which
    names no partition), in order; the caller flushes."""
    for partition, partition_values in values.items():
        for value in partition_values:
            producer.produce(topic, value=value, key=b"k", partition=partition)


def keyed(events: Iterable[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    return [(str(e["user_id"]).encode(), orjson.dumps(e)) for e in events]


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-reader", "enable.auto.commit": False,
                         "auto.offset.reset": "earliest"})
    partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < expected and time.monotonic() < deadline:
            got += [m for m in consumer.consume(1000, 0.5) if m.error() is None]
    finally:
        consumer.close()
    return got


def source_config(bootstrap: str, topic: str, **kw: Any) -> KafkaSourceConfig:
    return KafkaSourceConfig(bootstrap_servers=bootstrap, topic=topic, group_id=f"{topic}-g", mode="assign",
                             error_backoff_s=0.05, **kw)


def consume_all(source: KafkaSource, expected: int, timeout_s: float = 30.0) -> list[tuple[int, int, bytes | None]]:
    got: list[tuple[int, int, bytes | None]] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < expected and time.monotonic() < deadline:
        batch = source.consume(500, 0.2)
        got += list(zip(batch.partitions, batch.offsets, batch.values))
    return got


class Recorder:
    def __init__(self) -> None:
        self.assigned: list[int] = []
        self.revoked: list[int] = []

    def on_assign(self, partitions: list[int]) -> None:
        self.assigned += partitions

    def on_revoke(self, partitions: list[int]) -> None:
        self.revoked += partitions


# ------------------------------------------------------------------ source
def test_assign_mode_positions_seek_and_pause(broker: Any, unique_name: str) -> None:
    broker.create_topics([unique_name], partitions=2)
    produce(broker.bootstrap_servers, unique_name, [(None, f"m{i}".encode()) for i in range(40)], partitions=2)
    source = KafkaSource(source_config(broker.bootstrap_servers, unique_name))
    recorder = Recorder()
    source.set_listener(recorder)
    try:
        assert recorder.assigned == [0, 1] == source.assignment()
        got = consume_all(source, 40)
        ends = {0: 20, 1: 20}
        assert len(got) == 40 and source.positions() == {unique_name: ends}
        source.seek({unique_name: {0: 3}})
        again = consume_all(source, ends[0] - 3)
        assert [o for _, o, _ in again] == list(range(3, ends[0])) and {p for p, _, _ in again} == {0}
        source.pause()
        produce(broker.bootstrap_servers, unique_name, [(None, b"late")], partitions=2)
        assert len(source.consume(10, 1.0)) == 0
        source.resume()
        assert [v for _, _, v in consume_all(source, 1)] == [b"late"]
        assert source.commit(source.positions())
        assert all(lag == 0 for lag in source.lag().values())
    finally:
        source.close()
    config = source_config(broker.bootstrap_servers, unique_name)
    fresh, resumed = KafkaSource(config), KafkaSource(config.model_copy(update={"resume_from_committed": True}))
    try:  # commits feed lag tools; only a job without checkpoints resumes from them
        assert len(consume_all(fresh, 41)) == 41
        assert len(resumed.consume(100, 2.0)) == 0
    finally:
        fresh.close()
        resumed.close()


def test_subscribe_mode_starts_assigned_partitions_at_saved_offsets(broker: Any, unique_name: str) -> None:
    broker.create_topics([unique_name], partitions=2)
    produce(broker.bootstrap_servers, unique_name, [(None, f"m{i}".encode()) for i in range(30)], partitions=2)
    config = source_config(broker.bootstrap_servers, unique_name).model_copy(update={"mode": "subscribe"})
    source = KafkaSource(config)
    recorder = Recorder()
    source.set_listener(recorder)
    source.seek({unique_name: {0: 4, 1: 6}})  # e.g. from a checkpoint, before the group assigned anything
    try:
        got = consume_all(source, 30 - 4 - 6, timeout_s=60)  # the group's first join alone waits 3 s
        assert sorted(recorder.assigned) == [0, 1]
        assert sorted((p, o) for p, o, _ in got) == [(0, o) for o in range(4, 15)] + [(1, o) for o in range(6, 15)]
    finally:
        source.close()


def test_broker_stall_is_survived(broker: Any, unique_name: str) -> None:
    broker.create_topics([unique_name], partitions=1)
    source = KafkaSource(source_config(broker.bootstrap_servers, unique_name, stall_log_interval_s=60))
    try:
        produce(broker.bootstrap_servers, unique_name, [(None, b"before")])
        assert len(consume_all(source, 1)) == 1
        broker.pause()
        try:
            stalled_until = time.monotonic() + 3
            while time.monotonic() < stalled_until:
                assert len(source.consume(100, 0.3)) == 0  # never raises while the broker is frozen
        finally:
            broker.resume()
        produce(broker.bootstrap_servers, unique_name, [(None, b"after")])
        assert [v for _, _, v in consume_all(source, 1)] == [b"after"]
    finally:
        source.close()


# ------------------------------------------------------------------ pipeline end to end
def kafka_pipeline(bootstrap: str, topic: str, batch_size: int) -> BatchedPipeline:
    config = IngestConfig(source=source_config(bootstrap, topic), joiner=JOINER, dlq_topic=f"{topic}.dlq")
    return BatchedPipeline(build_pipeline(config, make_producer(config)), batch_size)


def run_until_consumed(batched: BatchedPipeline, total: int, timeout_s: float = 60.0) -> list[SampleBatch]:
    batches: list[SampleBatch] = []
    deadline = time.monotonic() + timeout_s
    while batched.pipeline.stats["messages"] < total and time.monotonic() < deadline:
        batches += batched.poll(2000, 0.2)
    assert batched.pipeline.stats["messages"] == total
    return batches + batched.flush()


def test_labels_end_to_end_from_kafka(broker: Any, unique_name: str) -> None:
    broker.create_topics([unique_name, f"{unique_name}.dlq"], partitions=3)
    events = synthetic_events(StreamSpec(exposures=1500, users=60, items=300, request_gap_ms=200, click_rate=0.2,
                                         convert_rate=0.3, click_delay_ms=(0, 25_000), seed=11))
    total = produce(broker.bootstrap_servers, unique_name, keyed(events))
    batched = kafka_pipeline(broker.bootstrap_servers, unique_name, batch_size=100)
    pipeline = batched.pipeline
    try:
        samples = concat_batches(run_until_consumed(batched, total))
    finally:
        assert pipeline.close() == 0
    got = {sid: (int(c), int(v)) for sid, c, v in zip(samples["sample_id"].tolist(), samples["click"], samples["convert"])}
    assert len(got) == len(samples["sample_id"])  # every exposure exactly once
    assert got == reference_labels(events, JOINER)
    positions = pipeline.positions()[unique_name]
    assert sum(positions.values()) == total
    assert set(samples["partition"].tolist()) == set(positions)  # ledger fields carry the exposure's place
    assert pipeline.dlq_counts["orphan_click"] > 0  # clicks 20-25 s after a 20 s window
    rejected = sum(pipeline.dlq_counts.values())
    reasons = Counter(orjson.loads(m.value())["reason"] for m in read_topic(broker.bootstrap_servers, f"{unique_name}.dlq", rejected))
    assert reasons == {k: v for k, v in pipeline.dlq_counts.items() if v}


def test_restart_from_state_and_positions_reproduces_the_batches(broker: Any, unique_name: str) -> None:
    """Exactly-once building block (DESIGN §6.1): state + positions taken together between
    polls, restored into a fresh consumer, give the uninterrupted batch sequence."""
    broker.create_topics([unique_name, f"{unique_name}.dlq"], partitions=3)
    events = synthetic_events(StreamSpec(exposures=1200, users=50, items=200, request_gap_ms=300, click_rate=0.2,
                                         convert_rate=0.3, seed=14))
    total = produce(broker.bootstrap_servers, unique_name, keyed(events))
    uninterrupted = kafka_pipeline(broker.bootstrap_servers, unique_name, batch_size=50)
    try:
        reference = run_until_consumed(uninterrupted, total)
    finally:
        uninterrupted.pipeline.close()

    first = kafka_pipeline(broker.bootstrap_servers, unique_name, batch_size=50)
    before: list[SampleBatch] = []
    try:
        while first.pipeline.stats["messages"] < total // 2:
            before += first.poll(300, 0.2)
        doc, arrays = flatten_state(first.state_dict())
        first.poll(300, 0.2)  # consumed after the checkpoint: lost in the crash, re-read after it
    finally:
        first.pipeline.close()
    second = kafka_pipeline(broker.bootstrap_servers, unique_name, batch_size=50)
    try:
        second.load_state_dict(unflatten_state(orjson.loads(orjson.dumps(doc)), arrays))
        after = run_until_consumed(second, total)
    finally:
        second.pipeline.close()
    resumed = before + after
    assert len(resumed) == len(reference)
    assert all(states_equal(a, b) for a, b in zip(resumed, reference))


def collect_malformed(n: int) -> list[bytes]:
    """``n`` malformed messages: hypothesis-fuzzed kinds (random bytes, JSON junk,
    mutated events), filtered to those the contract rejects, cycled up to ``n``."""
    valid = {"event_id": "v", "type": "exposure", "ts": 1_767_225_600_000, "user_id": "u", "item_id": "i",
             "request_id": "r"}
    scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
               | st.text(max_size=30) | st.just("x" * 300))
    junk = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                        max_leaves=8)
    mutated = st.builds(lambda over, drop: orjson.dumps({k: v for k, v in {**valid, **over}.items() if k not in drop}),
                        st.dictionaries(st.sampled_from(sorted(valid) + ["user_features", "context"]), junk, max_size=3),
                        st.sets(st.sampled_from(sorted(valid)), max_size=2))
    garbage = st.binary(max_size=120) | junk.map(orjson.dumps) | mutated
    decoder = EventDecoder(DecoderConfig(), (), ())
    found: list[bytes] = []

    @settings(max_examples=1500, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(garbage)
    def collect(value: bytes) -> None:
        if decoder.decode([value], [0], [0]).rejections:
            found.append(value)

    collect()
    fixed = [b"", b"\x00" * 10, b"[1,2]", b'{"ts": NaN}', orjson.dumps({**valid, "ts": -1}),
             orjson.dumps({**valid, "ts": 10**18}), orjson.dumps({**valid, "user_features": {"s": "y" * 200_000}}),
             orjson.dumps({**valid, "type": "purchase"}), orjson.dumps({**valid, "event_id": "e" * 200})]
    kinds = fixed + found
    return [kinds[i % len(kinds)] for i in range(n)]


def test_malformed_flood_lands_in_the_dlq_while_valid_events_make_samples(broker: Any, unique_name: str) -> None:
    broker.create_topics([unique_name, f"{unique_name}.dlq"], partitions=2)
    events = synthetic_events(StreamSpec(exposures=2000, users=40, items=300, request_gap_ms=100, click_rate=0.1,
                                         convert_rate=0.3, click_delay_ms=(0, 15_000), convert_delay_ms=(0, 50_000),
                                         seed=12))
    bad = collect_malformed(10_000)
    assert len(set(bad)) > 500
    good = keyed(events)
    mixed: list[tuple[bytes | None, bytes | None]] = []
    for i, message in enumerate(bad):  # valid events sit among the garbage, in order
        mixed.append((b"garbage", message))
        if i % 5 == 0 and good:
            mixed.append(good.pop(0))
    mixed += good
    total = produce(broker.bootstrap_servers, unique_name, mixed)
    batched = kafka_pipeline(broker.bootstrap_servers, unique_name, batch_size=256)
    pipeline = batched.pipeline
    try:
        samples = concat_batches(run_until_consumed(batched, total))
    finally:
        assert pipeline.close() == 0
    assert sorted(samples["sample_id"].tolist()) == sorted(hash_id(e["event_id"]) for e in events if e["type"] == "exposure")
    assert dict(zip(samples["sample_id"].tolist(), zip(samples["click"].tolist(), samples["convert"].tolist()))) == \
        {k: (float(c), float(v)) for k, (c, v) in reference_labels(events, JOINER).items()}
    decode_reasons = {r.value for r in Reason} - {"too_late", "orphan_click", "orphan_convert", "click_outside_window",
                                                   "convert_without_click", "convert_outside_window"}
    assert sum(pipeline.dlq_counts[r] for r in decode_reasons) == 10_000
    assert sum(pipeline.dlq_counts.values()) == 10_000  # the valid stream itself is clean
    records = [orjson.loads(m.value()) for m in read_topic(broker.bootstrap_servers, f"{unique_name}.dlq", 10_000)]
    assert len(records) == 10_000
    assert {r["reason"] for r in records} >= {"not_json", "not_object", "missing_field", "bad_type", "bad_ts",
                                              "unknown_type", "oversized", "event_id_too_long", "empty"}
    assert len({(r["partition"], r["offset"]) for r in records}) == 10_000


def test_run_join_produces_arrow_batches_and_commits(broker: Any, unique_name: str) -> None:
    topic, samples_topic = unique_name, f"{unique_name}.samples"
    broker.create_topics([topic, samples_topic, f"{topic}.dlq"], partitions=2)
    events = synthetic_events(StreamSpec(exposures=600, users=30, items=100, request_gap_ms=300, click_rate=0.2,
                                         click_delay_ms=(0, 10_000), convert_delay_ms=(0, 30_000), seed=13))
    # one late exposure per user moves every partition's watermark past all windows
    end = max(e["ts"] for e in events) + 10 * 60_000
    closers = [{"event_id": f"end-{u}", "type": "exposure", "ts": end, "user_id": u, "item_id": "i0", "request_id": f"end-{u}"}
               for u in sorted({e["user_id"] for e in events})]
    produce(broker.bootstrap_servers, topic, keyed(events + closers))
    config = IngestConfig(source=source_config(broker.bootstrap_servers, topic), joiner=JOINER, dlq_topic=f"{topic}.dlq",
                          commit_interval_s=0.5)
    stop = threading.Event()
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(summary=run_join(config, stop, to_topic=samples_topic)))
    worker.start()
    expected = reference_labels(events, JOINER)
    batches: list[SampleBatch] = []
    try:
        deadline = time.monotonic() + 60
        while sum(len(b["sample_id"]) for b in batches) < len(expected) and time.monotonic() < deadline:
            batches = [ipc_to_batch(m.value()) for m in read_topic(broker.bootstrap_servers, samples_topic, 10**9, timeout_s=2)]
    finally:
        stop.set()
        worker.join(60)
    samples = concat_batches(batches)
    assert {sid: (int(c), int(v)) for sid, c, v in zip(samples["sample_id"].tolist(), samples["click"], samples["convert"])} == expected
    summary = result["summary"]
    assert summary.samples == len(expected) and summary.commits >= 1
    committed = Consumer({"bootstrap.servers": broker.bootstrap_servers, "group.id": config.source.group_id})
    try:
        offsets = committed.committed([TopicPartition(topic, p) for p in (0, 1)], timeout=10)
    finally:
        committed.close()
    assert all(tp.offset >= 0 for tp in offsets)  # the pending closers keep it below the end


def test_redelivered_messages_below_positions_are_dropped(broker: Any, unique_name: str) -> None:
    """Whatever librdkafka re-delivers below our positions (a seek racing the first
    fetch) must never reach the joiner: it would be trained twice."""
    broker.create_topics([unique_name], partitions=1)
    produce(broker.bootstrap_servers, unique_name, [(None, f"m{i}".encode()) for i in range(20)])
    source = KafkaSource(source_config(broker.bootstrap_servers, unique_name))
    try:
        first = consume_all(source, 20)
        assert [o for _, o, _ in first] == list(range(20))
        source._consumer.seek(TopicPartition(unique_name, 0, 5))  # noqa: SLF001 - simulate a stale re-delivery
        produce(broker.bootstrap_servers, unique_name, [(None, b"new")])
        after = consume_all(source, 1)
        assert [(o, v) for _, o, v in after] == [(20, b"new")]
        assert source.stale_dropped == 15
    finally:
        source.close()
