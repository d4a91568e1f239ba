"""Ingest throughput: Kafka -> finished sample batches, beside a raw consume + JSON decode.

    python -m bench.ingest [--quick] [--events N] [--repeats R] [--profile]

Starts its own embedded broker, produces N events of a synthetic world (requests of 5
exposures from 2000 users over 5000 popularity-skewed items, 5 % clicked, 10 % of clicks
converted, with user/item/context features) to a 4-partition topic, then times, on the
same messages, alternately:

* **raw**: a ``confluent_kafka.Consumer`` assigned to all partitions, ``consume(2000)``,
  ``orjson.loads`` of every value — the practical ceiling of any Python consumer;
* **joiner**: ``consumers`` end to end — ``KafkaSource`` -> ``EventDecoder`` ->
  ``LabelJoiner`` -> sample batches of 256 (``IngestPipeline``), ``flush()`` at the end so
  every exposure leaves as a finished sample; default ``JoinerConfig``.

The benchmark process is pinned to one core and the broker to the other (2-core
machines). Each path is measured two ways, best of ``--repeats`` (the machine is shared:
background load only ever adds time): events per wall second, and CPU µs per event of the
consuming thread (``time.thread_time``: what the Python side costs, whatever the broker
or the neighbours do; librdkafka's fetch threads are not in it, for either path).
``ratio`` is joiner/raw events per second, ``cpu_ratio`` raw/joiner CPU per event: both
1.0 would mean joining is free. The last line is one JSON object.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import time
from dataclasses import dataclass

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from bench.common import announce_quick, interleaved, machine_info, parser, print_result
from consumers.config import DecoderConfig, JoinerConfig, KafkaSourceConfig, PopularityConfig
from consumers.decode import EventDecoder
from consumers.joiner import LabelJoiner
from consumers.pipeline import IngestPipeline
from consumers.popularity import InProcessPopularity
from consumers.source import KafkaSource
from consumers.testing import BatchedPipeline, ListDlqSink, StreamSpec, synthetic_events
from streamtrain.services import EmbeddedBroker

TOPIC = "bench-events"
PARTITIONS = 4
POLL = 2000


def produce(bootstrap: str, n_events: int) -> int:
    spec = StreamSpec(exposures=int(n_events / 1.055), users=2000, items=5000, request_gap_ms=100,
                      click_rate=0.05, convert_rate=0.10, click_delay_ms=(500, 120_000),
                      convert_delay_ms=(10_000, 3_600_000))
    events = synthetic_events(spec)
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "batch.num.messages": 10_000,
                         "queue.buffering.max.messages": 1_000_000})
    for e in events:
        while True:
            try:
                producer.produce(TOPIC, key=e["user_id"].encode(), value=orjson.dumps(e))
                break
            except BufferError:
                producer.poll(0.01)
    if producer.flush(120) != 0:
        raise RuntimeError("could not deliver the benchmark events")
    return len(events)


@dataclass(frozen=True)
class Timing:
    wall_s: float
    cpu_s: float  # CPU time of the consuming thread


def time_raw(bootstrap: str, total: int, run: int) -> Timing:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"raw-{run}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(TOPIC, p, 0) for p in range(PARTITIONS)])
    seen = 0
    start, cpu = time.perf_counter(), time.thread_time()
    while seen < total:
        for m in consumer.consume(min(POLL, total - seen), 1.0):  # never wait for messages that do not exist
            if m.error() is None:
                orjson.loads(m.value())
                seen += 1
    timing = Timing(time.perf_counter() - start, time.thread_time() - cpu)
    consumer.close()
    return timing


def time_joiner(bootstrap: str, total: int, run: int) -> tuple[Timing, int]:
    joiner_cfg = JoinerConfig()
    source = KafkaSource(KafkaSourceConfig(bootstrap_servers=bootstrap, topic=TOPIC, group_id=f"joiner-{run}",
                                           mode="assign"))
    pipeline = IngestPipeline(
        source,
        EventDecoder(DecoderConfig(), joiner_cfg.sparse_features, joiner_cfg.dense_features),
        LabelJoiner(joiner_cfg, InProcessPopularity(PopularityConfig())),
        ListDlqSink(),
    )
    batched = BatchedPipeline(pipeline, 256)  # fixed-size training batches, cut as the daemon cuts them
    samples = 0
    start, cpu = time.perf_counter(), time.thread_time()
    while pipeline.stats["messages"] < total:
        remaining = total - pipeline.stats["messages"]
        samples += sum(len(b["sample_id"]) for b in batched.poll(min(POLL, remaining), 1.0))
    samples += sum(len(b["sample_id"]) for b in batched.flush())
    timing = Timing(time.perf_counter() - start, time.thread_time() - cpu)
    pipeline.close()
    if sum(pipeline.dlq_counts.values()):
        raise RuntimeError(f"valid benchmark events were rejected: {pipeline.dlq_counts}")
    return timing, samples


def pin(pid: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(pid, cpus)
    except (AttributeError, OSError):  # not Linux, or not allowed: run unpinned
        pass


def main() -> None:
    cli = parser(__doc__, "100k events, 1 repeat (< 1 minute)")
    cli.add_argument("--events", type=int, default=None, help="events to produce (default 600k, quick 100k)")
    cli.add_argument("--repeats", type=int, default=None, help="alternating runs per path (default 3, quick 1)")
    cli.add_argument("--profile", action="store_true", help="print a cProfile of one joiner run")
    args = cli.parse_args()
    n_events = args.events or (100_000 if args.quick else 600_000)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.quick:
        announce_quick({"events": n_events, "repeats": repeats})

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    machine = machine_info(pinned=len(cpus) >= 2)  # before pinning narrows this process to one CPU
    with EmbeddedBroker() as broker:
        broker.create_topics([TOPIC], partitions=PARTITIONS)
        if len(cpus) >= 2 and broker.pid is not None:
            pin(broker.pid, set(cpus[:-1]))
            pin(0, {cpus[-1]})  # before any client starts: librdkafka threads inherit it
        total = produce(broker.bootstrap_servers, n_events)
        print(f"produced {total} events to {PARTITIONS} partitions")
        bootstrap = broker.bootstrap_servers
        runs = interleaved({"raw": lambda run: time_raw(bootstrap, total, run),
                            "joiner": lambda run: time_joiner(bootstrap, total, run)}, repeats)
        raw_t: list[Timing] = runs["raw"]
        joiner_t, samples_per_run = zip(*runs["joiner"])
        for run, (raw, joined, samples) in enumerate(zip(raw_t, joiner_t, samples_per_run)):
            print(f"run {run}: raw {total / raw.wall_s:,.0f} events/s {raw.cpu_s / total * 1e6:.2f} cpu µs/event, "
                  f"joiner {total / joined.wall_s:,.0f} events/s {joined.cpu_s / total * 1e6:.2f} cpu µs/event "
                  f"({samples} samples)")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(time_joiner, bootstrap, total, repeats)
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
    raw_rate = total / min(t.wall_s for t in raw_t)
    joiner_rate = total / min(t.wall_s for t in joiner_t)
    raw_us = min(t.cpu_s for t in raw_t) / total * 1e6
    joiner_us = min(t.cpu_s for t in joiner_t) / total * 1e6
    print_result({
        "benchmark": "ingest", "events": total, "samples": samples_per_run[-1], "repeats": repeats,
        "raw_events_per_s": round(raw_rate), "joiner_events_per_s": round(joiner_rate),
        "ratio": round(joiner_rate / raw_rate, 3),
        "raw_cpu_us_per_event": round(raw_us, 3), "joiner_cpu_us_per_event": round(joiner_us, 3),
        "cpu_ratio": round(raw_us / joiner_us, 3), "machine": machine,
    })


if __name__ == "__main__":
    main()
