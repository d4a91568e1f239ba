"""Regression tests for inputs an audit found silently accepted (issue #10 item 5): each
is now a DLQ reason or an accepted-and-counted degradation, as docs/events.md says.

Pure decoder first, then the pipeline over the list source, then the real broker."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from consumers.config import DecoderConfig, IngestConfig, JoinerConfig, KafkaSourceConfig, PopularityConfig
from consumers.decode import EventDecoder, key_for_user
from consumers.joiner import LabelJoiner
from consumers.pipeline import IngestPipeline
from consumers.popularity import InProcessPopularity
from consumers.reasons import Reason
from consumers.runtime import build_pipeline, make_producer
from consumers.schema import hash_id
from consumers.testing import ListDlqSink, ListSource, StreamSpec, producer_key, synthetic_events
from streamtrain.services.topics import create_topics

SPARSE = ("user.segment", "item.category", "context.device")
DENSE = ("item.price",)
VALID: dict[str, Any] = {"event_id": "e1", "type": "exposure", "ts": 1_767_225_600_000, "user_id": "u1",
                         "item_id": 42, "request_id": "r1", "user_features": {"segment": "s1"},
                         "item_features": {"category": "c3", "price": 9.5}, "context": {"device": "ios"}}
GOOD = orjson.dumps(VALID)


def decoder(**overrides: Any) -> EventDecoder:
    return EventDecoder(DecoderConfig(**overrides), SPARSE, DENSE)


def verdict(value: bytes, key: bytes | None = b"u1", **overrides: Any) -> str:
    """"" when accepted, else the reason; asserts validate() says the same."""
    dec = decoder(**overrides)
    out = dec.decode([value], [0], [0], [key])
    got = out.rejections[0].reason.value if out.rejections else ""
    problem = dec.validate(orjson.loads(value), raw=value, key=key)
    assert (problem[0].value if problem else "") == got
    return got


def with_field(name: str, literal: bytes, value: bytes = GOOD) -> bytes:
    """``value`` with one more ``"name": literal`` pair at the end (a dict cannot repeat a name)."""
    return value[:-1] + b',"' + name.encode() + b'":' + literal + b"}"


# ---------------------------------------------------------------- repeated names
@pytest.mark.parametrize("value", [
    with_field("type", b'"click"'),  # orjson would keep the click
    with_field("type", b'"exposure"'),  # even a harmless repeat: the producer is broken
    with_field("typ\\u0065", b'"click"'),  # escaped: no byte count sees it
    with_field("user_id", b'"u2"'),
    orjson.dumps({**VALID, "request_id": "r:1"})[:-1] + b',"ts":1767225600001}',  # ':' in a string too
    GOOD.replace(b'"price":9.5', b'"price":9.5,"price":1'),  # inside a feature object
    GOOD.replace(b'"context":', b'"context":{},"context":'),
], ids=["type", "same-value", "escaped", "user_id", "with-colon", "feature", "feature-object"])
def test_a_repeated_name_is_a_duplicate_field(value: bytes) -> None:
    assert verdict(value) == "duplicate_field"


@pytest.mark.parametrize("value", [
    with_field("extra", b'{"a":1,"a":2}'),  # below an unknown field: not read, not checked
    orjson.dumps({**VALID, "request_id": "type", "event_id": "a:b"}),  # names as values, ':' in values
    orjson.dumps({**VALID, "user_features": {"segment": "price"}, "extra": "\"price\\"}),
], ids=["unknown-nested", "names-as-values", "escapes-no-repeat"])
def test_names_that_only_look_repeated_are_accepted(value: bytes) -> None:
    assert verdict(value) == ""


# ---------------------------------------------------------------- ids
@pytest.mark.parametrize("field", ["event_id", "user_id", "item_id", "request_id"])
@pytest.mark.parametrize("bad", [" ", " \t ", "\u00a0\u3000", "\x00", "u1\x00", "u\n1", "u\x7f", "u\x85", "\x1b[0m"])
def test_blank_and_control_character_ids_are_bad_id(field: str, bad: str) -> None:
    value = orjson.dumps({**VALID, field: bad})
    assert verdict(value, key=key_for_user(bad) if field == "user_id" else b"u1") == "bad_id"


@pytest.mark.parametrize("good", ["u 1", " u1", "ü-ñ", "用户", "a\u00a0b", "\U0001f600"])
def test_ids_are_opaque_text_otherwise(good: str) -> None:
    for field in ("event_id", "user_id", "item_id", "request_id"):
        assert verdict(orjson.dumps({**VALID, field: good}), key=key_for_user(good) if field == "user_id" else b"u1") == ""


# ---------------------------------------------------------------- message key
def test_the_key_must_be_the_user_id() -> None:
    assert verdict(GOOD, key=None) == "missing_key"
    for wrong in (b"u2", b"", b"U1", b"u1 ", b"\x00\x00\x00\x01"):
        assert verdict(GOOD, key=wrong) == "key_mismatch"
    number = orjson.dumps({**VALID, "user_id": 1234})
    assert verdict(number, key=b"1234") == ""  # integers compare in decimal, like their hash
    assert verdict(number, key=b"01234") == "key_mismatch"
    assert verdict(number, key=(1234).to_bytes(8, "big")) == "key_mismatch"  # a Java LongSerializer key


def test_the_key_rule_can_be_turned_off_and_needs_keys() -> None:
    assert verdict(GOOD, key=b"someone-else", check_key=False) == ""
    assert verdict(GOOD, key=None, check_key=False) == ""
    out = decoder().decode([GOOD], [0], [0])  # no keys known (values replayed from a file)
    assert len(out.events) == 1 and not out.rejections


def test_content_reasons_come_before_the_key() -> None:
    """A garbage message under a wrong key keeps its precise reason."""
    assert verdict(orjson.dumps({**VALID, "type": "purchase"}), key=None) == "unknown_type"
    assert verdict(with_field("type", b'"click"'), key=b"x") == "duplicate_field"


# ---------------------------------------------------------------- numbers
BEYOND_64 = b"123456789012345678901234"  # orjson parses it as a double


@pytest.mark.parametrize("field", ["ts", "user_id", "item_id"])
@pytest.mark.parametrize("literal", [BEYOND_64, b"-" + BEYOND_64, b"18446744073709551616", b"-9223372036854775809"])
def test_integers_beyond_64_bits_are_bad_type_where_an_integer_is_required(field: str, literal: bytes) -> None:
    value = GOOD.replace(b'"%s":' % field.encode() + orjson.dumps(VALID[field]), b'"%s":' % field.encode() + literal)
    assert value != GOOD
    assert verdict(value) == "bad_type"  # fast path (decode) and validate() alike


def test_largest_64_bit_ids_are_accepted_and_beyond_double_range_is_not_json() -> None:
    for n in (2**64 - 1, -(2**63)):
        assert verdict(orjson.dumps({**VALID, "item_id": n})) == ""
    out = decoder().decode([GOOD.replace(b"9.5", b"1" + b"0" * 400)], [0], [0], [b"u1"])
    assert [r.reason for r in out.rejections] == [Reason.NOT_JSON]


def test_degraded_feature_values_are_accepted_and_counted() -> None:
    values = [GOOD.replace(b"9.5", b'"12.5"'),  # a number sent as a string: not parsed
              GOOD.replace(b"9.5", b"1e308"),  # beyond float32
              GOOD.replace(b"9.5", b"-3.5e38"),
              GOOD.replace(b'"c3"', BEYOND_64),  # a sparse integer beyond 64 bits: a double now
              GOOD.replace(b"9.5", BEYOND_64),  # a dense one is just a large float32
              GOOD]
    out = decoder().decode(values, [0] * 6, list(range(6)), [b"u1"] * 6)
    assert not out.rejections
    assert out.counters == {"dense_type_mismatches": 1, "dense_out_of_range": 2, "sparse_inexact_numbers": 1}
    assert np.isnan(out.events.dense[:3, 0]).all()
    assert out.events.dense[4, 0] == np.float32(1.2345678901234568e23) and out.events.dense[5, 0] == 9.5
    assert out.events.sparse[3, 1] != 0


def test_degraded_values_on_clicks_are_not_read_so_not_counted() -> None:
    click = orjson.dumps({**VALID, "type": "click", "item_features": {"price": "12.5"}})
    assert decoder().decode([click], [0], [0], [b"u1"]).counters["dense_type_mismatches"] == 0


# ---------------------------------------------------------------- the fast path stays fast
class CountingDecoder(EventDecoder):
    def __init__(self) -> None:
        super().__init__(DecoderConfig(), SPARSE, DENSE)
        self.slow = 0

    def validate(self, *args: Any, **kwargs: Any) -> Any:
        self.slow += 1
        return super().validate(*args, **kwargs)


def test_valid_events_never_take_the_slow_path() -> None:
    events = synthetic_events(StreamSpec(exposures=300, seed=3))
    events += [{**e, "request_id": f"req:{e['request_id']}", "user_id": f"user:{e['user_id']}"} for e in events[:50]]
    values = [orjson.dumps(e) for e in events]
    dec = CountingDecoder()
    out = dec.decode(values, [0] * len(values), list(range(len(values))), [producer_key(v) for v in values])
    assert len(out.events) == len(values) and dec.slow == 0


# ---------------------------------------------------------------- pipeline (list source)
JOINER = JoinerConfig(click_window_ms=20_000, convert_window_ms=60_000, allowed_lateness_ms=1_000,
                      stats_refresh_ms=30_000, history_len=8, num_random_negatives=2)


def test_list_source_keys_reach_the_decoder() -> None:
    events = synthetic_events(StreamSpec(exposures=20, users=3, click_rate=0.3, click_delay_ms=(0, 10_000),
                                         convert_rate=0.0, seed=4))
    values = [orjson.dumps(e) for e in events]
    keys = [producer_key(v) for v in values]
    clicked = {e["event_id"].removesuffix("-c") for e in events if e["type"] == "click"}
    first, second = [i for i, e in enumerate(events) if e["type"] == "exposure" and e["event_id"] not in clicked][2:4]
    keys[first], keys[second] = b"someone-else", None  # unclicked exposures: nothing joins to them

    def run(source: ListSource) -> IngestPipeline:
        decoder = EventDecoder(DecoderConfig(), JOINER.sparse_features, JOINER.dense_features)
        pipeline = IngestPipeline(source, decoder, LabelJoiner(JOINER, InProcessPopularity(PopularityConfig())),
                                  ListDlqSink())
        while source.remaining():
            pipeline.poll()
        pipeline.flush()
        return pipeline

    assert sum(run(ListSource({0: values})).dlq_counts.values()) == 0  # default keys: the producers' rule
    pipeline = run(ListSource({0: values}, keys={0: keys}))
    assert [(r.reason, r.offset) for r in pipeline.dlq.rejections] == [(Reason.KEY_MISMATCH, first),
                                                                        (Reason.MISSING_KEY, second)]
    with pytest.raises(ValueError, match="one key per message"):
        ListSource({0: values}, keys={0: keys[:-1]})


# ---------------------------------------------------------------- the real broker
def read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{topic}-reader", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions])
    got: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < expected and time.monotonic() < deadline:
            got += [m for m in consumer.consume(100, 0.5) if m.error() is None]
    finally:
        consumer.close()
    return got


def test_mis_keyed_and_nul_id_messages_reach_the_dlq_topic_beside_valid_events(kafka_bootstrap: str,
                                                                               unique_name: str) -> None:
    topic, dlq_topic = unique_name, f"{unique_name}.dlq"
    create_topics(kafka_bootstrap, [topic, dlq_topic], partitions=2)
    ts = VALID["ts"]

    def event(eid: str, user: str | int, kind: str = "exposure", request: str = "r1", **over: Any) -> bytes:
        return orjson.dumps({"event_id": eid, "type": kind, "ts": ts + len(eid), "user_id": user, "item_id": "i1",
                             "request_id": request, **over})

    messages = {  # partition -> [(key, value)], produced in this order to explicit partitions
        0: [(b"u1", event("x1", "u1")),
            (b"u2", event("x2", "u1", request="r2")),  # key of another user: key_mismatch
            (b"u1", event("x3", "u1", request="r3", item_id="i\x00")),  # NUL in an id: bad_id
            (b"u1", event("x1-click", "u1", kind="click")),  # the valid exposure's click still joins
            (None, event("x4", "u1", request="r4"))],  # no key: missing_key
        1: [(b"u3", event("y1", "u3", request="s1")),
            (b"77", event("y2", 77, request="s2")),  # an integer user keyed in decimal
            (b"u3", event("y3", "  ", request="s3"))],  # blank user id: bad_id (keyed by the producer anyway)
    }
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for partition, pairs in messages.items():
        for key, value in pairs:
            producer.produce(topic, value=value, key=key, partition=partition)
    assert producer.flush(30) == 0
    total = sum(map(len, messages.values()))
    config = IngestConfig(source=KafkaSourceConfig(bootstrap_servers=kafka_bootstrap, topic=topic,
                                                   group_id=f"{topic}-g", mode="assign", error_backoff_s=0.05),
                          joiner=JOINER, dlq_topic=dlq_topic)
    pipeline = build_pipeline(config, make_producer(config))
    try:
        samples = []
        deadline = time.monotonic() + 60
        while pipeline.stats["messages"] < total and time.monotonic() < deadline:
            samples += pipeline.poll(100, 0.2)
        samples += pipeline.flush()
    finally:
        assert pipeline.close() == 0
    emitted = {int(s): int(c) for b in samples for s, c in zip(b["sample_id"], b["click"])}
    assert emitted == {hash_id("x1"): 1, hash_id("y1"): 0, hash_id("y2"): 0}
    records = [orjson.loads(m.value()) for m in read_all(kafka_bootstrap, dlq_topic, 4)]
    assert sorted((r["partition"], r["offset"], r["reason"]) for r in records) == [
        (0, 1, "key_mismatch"), (0, 2, "bad_id"), (0, 4, "missing_key"), (1, 2, "bad_id")]
    assert Counter(r["reason"] for r in records) == {k[4:]: v for k, v in pipeline.counters.items()
                                                     if k.startswith("dlq.") and v}
