"""Wiring for real deployments: build a Kafka-backed pipeline (daemon) and run the
consumer side alone, producing Arrow sample batches to a topic (``streamtrain join``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Producer

from consumers.arrow_io import ArrowSampleSink
from consumers.config import IngestConfig, PopularityConfig
from consumers.decode import EventDecoder
from consumers.dlq import KafkaDlqSink
from consumers.joiner import LabelJoiner
from consumers.pipeline import IngestPipeline
from consumers.popularity import InProcessPopularity, PopularitySource, RedisPopularity
from consumers.source import KafkaSource, MessageSource, Offsets
from consumers.topic import SoleJoiner, TopicExchange

log = logging.getLogger(__name__)


def make_popularity(config: PopularityConfig) -> PopularitySource:
    return RedisPopularity(config) if config.backend == "redis" else InProcessPopularity(config)


def make_producer(config: IngestConfig) -> Producer:
    """A producer for the DLQ and samples topics, on the source's cluster."""
    return Producer({
        "bootstrap.servers": config.source.bootstrap_servers,
        "linger.ms": 20,  # batch small DLQ/sample messages
        "logger": log,  # librdkafka's own lines go through logging, not raw stderr
        **config.source.client_overrides,
    })


def build_pipeline(config: IngestConfig, producer: Producer, source: MessageSource | None = None,
                   wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
                   exchange: TopicExchange = SoleJoiner()) -> IngestPipeline:
    """Source (default: a :class:`KafkaSource` from ``config.source``) -> decoder ->
    joiner -> DLQ topic. ``wall_clock_ms`` is read only when
    ``decoder.max_clock_skew_ms`` is set; ``exchange``: the other joiners of the topic
    (``consumers/topic.py``)."""
    decoder = EventDecoder(config.decoder, config.joiner.sparse_features, config.joiner.dense_features,
                           clock=wall_clock_ms)
    joiner = LabelJoiner(config.joiner, make_popularity(config.popularity), exchange)
    dlq = KafkaDlqSink(producer, config.dlq_topic, config.source.topic,
                       stall_log_interval_s=config.source.stall_log_interval_s)
    return IngestPipeline(source or KafkaSource(config.source), decoder, joiner, dlq)


@dataclass
class JoinSummary:
    messages: int = 0  # consumed from the events topic
    samples: int = 0  # rows produced to the samples topic
    sample_messages: int = 0  # Arrow IPC messages produced
    commits: int = 0  # successful offset commits
    counters: dict[str, int] = field(default_factory=dict)


def safe_offsets(pipeline: IngestPipeline) -> Offsets:
    """Per partition, where a restart must re-read from so that nothing pending is lost:
    the older of the next position and the oldest message the joiner still holds."""
    held = pipeline.joiner.min_live_offsets()
    return {topic: {p: min(o, held.get(p, o)) for p, o in parts.items()}
            for topic, parts in pipeline.positions().items()}


def run_join(config: IngestConfig, stop_event: threading.Event, to_topic: str | None = None) -> JoinSummary:
    """Consume events, join, produce Arrow sample batches to ``to_topic`` (default
    ``config.samples_topic``) until ``stop_event`` is set.

    Delivery is at-least-once: the joiner state is not checkpointed here, so committed
    offsets are :func:`safe_offsets` (taken after the samples before them were
    delivered), a restart resumes from them (``resume_from_committed`` is forced on) and
    re-emits the samples still pending at the last commit; their user histories restart
    from that point. Consumers dedupe on ``sample_id``.
    """
    producer = make_producer(config)
    source = KafkaSource(config.source.model_copy(update={"resume_from_committed": True}))  # no checkpoints here
    pipeline = build_pipeline(config, producer, source=source)
    sink = ArrowSampleSink(producer, to_topic or config.samples_topic,
                           stall_log_interval_s=config.source.stall_log_interval_s)
    summary = JoinSummary()
    last_commit = time.monotonic()
    popularity = pipeline.joiner.popularity
    popularity.sync()  # no checkpoints here: external statistics enter at start and at commits

    def commit() -> None:
        if sink.flush(30.0) == 0 and source.commit(safe_offsets(pipeline)):
            summary.commits += 1
        if popularity.sync_due():
            popularity.sync()

    try:
        while not stop_event.is_set():
            for batch in pipeline.poll(config.poll_max_messages, config.poll_timeout_s):
                summary.samples += len(batch["sample_id"])
                summary.sample_messages += sink.send(batch)
            if time.monotonic() - last_commit >= config.commit_interval_s:
                commit()
                last_commit = time.monotonic()
    finally:
        commit()
        pipeline.close()
        summary.messages = pipeline.stats["messages"]
        summary.counters = pipeline.counters
        log.info("join stopped: %s", summary)
    return summary
