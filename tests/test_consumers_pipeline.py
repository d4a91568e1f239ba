"""The pipeline over the list-backed source: exact batches, merge-order independence,
crash/restore equivalence, DLQ accounting, flow control, Arrow IPC."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import orjson
import pytest

from consumers.arrow_io import ArrowSampleSink, batch_to_ipc, ipc_to_batch
from consumers.config import DecoderConfig, JoinerConfig, PopularityConfig
from consumers.decode import EventDecoder
from consumers.joiner import LabelJoiner
from consumers.pipeline import IngestPipeline
from consumers.popularity import InProcessPopularity
from consumers.produce import BlockingProducer
from consumers.schema import SampleBatch, concat_batches, empty_batch, hash_id, validate_batch
from consumers.state import flatten_state, states_equal, unflatten_state
from consumers.testing import BatchedPipeline, ListDlqSink, ListSource, StreamSpec, encode_partitioned, synthetic_events

CFG = JoinerConfig(click_window_ms=20_000, convert_window_ms=60_000, allowed_lateness_ms=1_000,
                   stats_refresh_ms=30_000, history_len=6, num_random_negatives=2)
PARTITIONS = 3


def stream(seed: int = 0, exposures: int = 1200) -> dict[int, list[bytes]]:
    events = synthetic_events(StreamSpec(exposures=exposures, users=30, items=200, request_gap_ms=250,
                                         click_rate=0.2, convert_rate=0.3, seed=seed))
    return encode_partitioned(events, PARTITIONS)


def bare_pipeline(logs: dict[int, list[bytes]], interleave_seed: int | None = None,
                  cfg: JoinerConfig = CFG) -> IngestPipeline:
    source = ListSource(logs, interleave_seed=interleave_seed)
    decoder = EventDecoder(DecoderConfig(), cfg.sparse_features, cfg.dense_features)
    joiner = LabelJoiner(cfg, InProcessPopularity(PopularityConfig()))
    return IngestPipeline(source, decoder, joiner, ListDlqSink())


def pipeline(logs: dict[int, list[bytes]], interleave_seed: int | None = None, cfg: JoinerConfig = CFG) -> BatchedPipeline:
    """Batches of 64, cut as the daemon cuts them."""
    return BatchedPipeline(bare_pipeline(logs, interleave_seed, cfg), 64)


def drain(p: BatchedPipeline, poll_size: int, flush: bool = True) -> list[SampleBatch]:
    out: list[SampleBatch] = []
    source: Any = p.pipeline.source
    while source.remaining():
        out += p.poll(poll_size)
    return out + (p.flush() if flush else [])


def assert_same_batches(a: list[SampleBatch], b: list[SampleBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert states_equal(x, y)


def test_batches_are_exact_and_independent_of_interleaving_and_poll_size() -> None:
    logs = stream()
    reference = drain(pipeline(logs), poll_size=500)
    assert all(len(b["sample_id"]) == 64 for b in reference[:-1]) and 0 < len(reference[-1]["sample_id"]) <= 64
    for b in reference:
        validate_batch(b)
    ids = np.concatenate([b["sample_id"] for b in reference])
    exposures = [orjson.loads(v) for log in logs.values() for v in log]
    assert sorted(ids.tolist()) == sorted(hash_id(e["event_id"]) for e in exposures if e["type"] == "exposure")
    for seed, poll_size in ((1, 7), (2, 113), (3, 2000)):
        assert_same_batches(drain(pipeline(logs, interleave_seed=seed), poll_size), reference)


@pytest.mark.parametrize("crash_after_polls", [3, 11, 25])
def test_restore_from_state_reproduces_the_uninterrupted_batches(crash_after_polls: int) -> None:
    logs = stream(seed=1)
    reference = drain(pipeline(logs), poll_size=50)

    first = pipeline(logs, interleave_seed=5)
    before: list[SampleBatch] = []
    for _ in range(crash_after_polls):
        before += first.poll(50)
    doc, arrays = flatten_state(first.state_dict())  # what a checkpoint would hold
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    buf.seek(0)
    with np.load(buf, allow_pickle=False) as npz:
        state = unflatten_state(orjson.loads(orjson.dumps(doc)), {k: npz[k] for k in npz.files})
    first.poll(50)  # progress after the checkpoint is lost with the crash

    second = pipeline(logs, interleave_seed=9)  # a restart sees another interleaving
    second.load_state_dict(state)
    assert second.pipeline.positions() == {"events": {int(p): o for p, o in state["positions"]["events"].items()}}
    assert_same_batches(before + drain(second, poll_size=77), reference)
    assert second.pipeline.counters == pipeline_counters_of(logs)


def pipeline_counters_of(logs: dict[int, list[bytes]]) -> dict[str, int]:
    p = pipeline(logs)
    drain(p, poll_size=1000)
    return p.pipeline.counters


def test_bad_messages_reach_the_dlq_and_the_counters() -> None:
    logs = stream(seed=2, exposures=200)
    logs[0][5:5] = [b"garbage", orjson.dumps({"event_id": "x"}), None]
    p = pipeline(logs)
    batches = drain(p, poll_size=100)
    sink: Any = p.pipeline.dlq
    reasons = sorted(r.reason.value for r in sink.rejections if r.partition == 0 and r.offset in (5, 6, 7))
    assert reasons == ["empty", "missing_field", "not_json"]
    counters = p.pipeline.counters
    assert counters["dlq.not_json"] == 1 and counters["dlq.missing_field"] == 1 and counters["dlq.empty"] == 1
    assert sum(v for k, v in counters.items() if k.startswith("dlq.")) == len(sink.rejections)
    assert counters["samples_emitted"] == sum(len(b["sample_id"]) for b in batches) == 200
    assert counters["messages"] == sum(len(v) for v in logs.values())


def test_pause_stops_consumption_until_resumed() -> None:
    p = bare_pipeline(stream(seed=3, exposures=100))
    p.pause()
    assert p.poll(100) == [] and p.positions() == {"events": dict.fromkeys(range(PARTITIONS), 0)}
    p.resume()
    p.poll(100)
    assert sum(p.positions()["events"].values()) == 100


def test_decoder_and_joiner_must_declare_the_same_features() -> None:
    decoder = EventDecoder(DecoderConfig(), ("user.segment",), CFG.dense_features)
    with pytest.raises(ValueError, match="features"):
        IngestPipeline(ListSource({0: []}), decoder, LabelJoiner(CFG, InProcessPopularity(PopularityConfig())), ListDlqSink())


def test_state_holds_no_positions_and_a_restore_seeks_to_the_saved_ones() -> None:
    """Offsets have one home (the checkpoint manifest, here the BatchedPipeline's state):
    the pipeline's own state carries none, so a restore cannot read a second, stale copy."""
    p = pipeline(stream(seed=4, exposures=50))
    p.poll(100)
    assert "positions" not in p.pipeline.state_dict()
    restored = pipeline(stream(seed=4, exposures=50))
    restored.load_state_dict(p.state_dict())
    assert restored.pipeline.positions() == p.pipeline.positions()


class _CapturingProducer:
    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes, bytes | None]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.messages.append((topic, value, key))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        return 0


def test_arrow_ipc_round_trip_and_sink_splitting() -> None:
    batch = concat_batches(drain(pipeline(stream(seed=5, exposures=300)), poll_size=500))
    assert states_equal(ipc_to_batch(batch_to_ipc(batch)), batch)
    empty = empty_batch(6, 2, 3, 1)
    assert states_equal(ipc_to_batch(batch_to_ipc(empty)), empty)

    producer = _CapturingProducer()
    sink = ArrowSampleSink(producer, "samples", max_message_bytes=20_000)
    sent = sink.send(batch)
    assert sent == len(producer.messages) > 1
    assert all(len(value) < 20_000 and topic == "samples" for topic, value, _ in producer.messages)
    assert states_equal(concat_batches([ipc_to_batch(v) for _, v, _ in producer.messages]), batch)


def test_blocking_producer_waits_out_a_full_queue_instead_of_dropping() -> None:
    class FullThenFree(_CapturingProducer):
        def __init__(self) -> None:
            super().__init__()
            self.refusals = 3
            self.polls = 0

        def produce(self, topic: str, value: bytes, key: bytes | None = None) -> None:
            if self.refusals:
                self.refusals -= 1
                raise BufferError("queue full")
            super().produce(topic, value, key)

        def poll(self, timeout: float) -> int:
            self.polls += 1
            return 0

    inner = FullThenFree()
    BlockingProducer(inner).produce("events.dlq", b"record", key=b"k")
    assert inner.messages == [("events.dlq", b"record", b"k")] and inner.polls == 3


def test_end_of_input_markers_release_every_sample_and_are_not_events() -> None:
    """A finite log ended by a marker per partition: once the last partition's marker is
    read, every pending sample is out (as flush() would give), and no marker is a message,
    a DLQ record or a counted event. The state remembers which partitions ended."""
    logs = stream(seed=6, exposures=300)
    reference = pipeline(logs)
    flushed = concat_batches(drain(reference, poll_size=37))
    marked = BatchedPipeline(IngestPipeline(ListSource(logs, end_of_input=True), *_parts()), 64)
    got: list[SampleBatch] = []
    while not marked.pipeline.end_of_input:
        got += marked.poll(37)
    rest = marked.buffer.drain()
    assert states_equal(concat_batches(got + ([rest] if rest is not None else [])), flushed)
    assert marked.pipeline.stats["messages"] == sum(len(v) for v in logs.values())
    assert marked.pipeline.counters == reference.pipeline.counters  # the same DLQ records, nothing for markers
    assert marked.pipeline.state_dict()["ended"] == list(range(PARTITIONS))


def _parts(cfg: JoinerConfig = CFG) -> tuple[EventDecoder, LabelJoiner, ListDlqSink]:
    decoder = EventDecoder(DecoderConfig(), cfg.sparse_features, cfg.dense_features)
    return decoder, LabelJoiner(cfg, InProcessPopularity(PopularityConfig())), ListDlqSink()
