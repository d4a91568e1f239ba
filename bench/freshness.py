"""Freshness: from an exposure handed to the producer to the step that trained it (part of ``bench.daemon``).

The simulator produces in a background thread at a fixed ``rate`` while the daemon trains.
Per exposure: *produced* (handed to the Kafka producer) -> *trained* (the ``Trainer.step``
whose batch held its first, non-correction sample returned). The joiner emits a sample only
once the event-time watermark (minimum over partitions of the newest ts seen, minus
``allowed_lateness_ms``) passes ``ts + click_window_ms``; so freshness is split into the
*label-window wait* (produced -> the producer sent the event that moved that watermark past
the window: a floor set by event time, replayed from the produced sequence with the
producer's partitioner, which is checked against the partition of every trained sample)
and the *pipeline* part (window closed -> trained), itself split at the end of the
``pipeline.poll`` that emitted the sample (delivery, fetch, poll wait, decode, join | batch
fill, queueing behind earlier steps, the step, checkpoint/release stalls). Event time runs
``time_scale`` times faster than wall time, so the 600 s click window lasts 600/time_scale s
of wall time; the simulated world's request density is scaled so that ``rate`` events/s
*is* that time scale. Exposures produced in [warm-up, run time] are measured; production
goes on until every one of them is trained (a partial batch trains only when more samples
come). In production (time scale 1) the label wait is the whole window: only the pipeline
part carries over.

Under overload down-sampling (``streamtrain/runtime/overload.py``) some unclicked exposures
are never trained: an exposure counts as *dropped* once a sample emitted after it was
trained (the trainer takes samples first in, first out), and freshness is that of the
trained ones. ``keep_rate_min`` / ``keep_rate_final`` come from the daemon's status.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.daemon_probes import PollClock, StepClock, clock_hooks
from bench.demo_setup import DemoSetup, broker_state
from consumers.schema import hash_id
from streamtrain.runtime import Daemon
from streamtrain.services.topics import create_topics
from streamtrain.simulator import EventStream, KafkaSink, SimEvent, SimulatorConfig, run_simulation


@dataclass(frozen=True)
class Sizes:
    seconds: float  # of production whose exposures are measured
    warmup_s: float  # leading seconds left out (start-up)


QUICK = Sizes(seconds=8.0, warmup_s=2.0)
FULL = Sizes(seconds=60.0, warmup_s=5.0)


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


class RecordingSink:
    """The simulator's KafkaSink, recording when each event was handed to the producer,
    its event time and the partition librdkafka's default partitioner gives its key
    (``consistent_random``: CRC-32 of the key modulo the partition count)."""

    def __init__(self, inner: KafkaSink, partitions: int) -> None:
        self.inner = inner
        self.partitions = partitions
        self.wall: list[float] = []
        self.ts: list[int] = []
        self.partition: list[int] = []

    def send(self, event: SimEvent) -> None:
        self.inner.send(event)
        self.wall.append(time.perf_counter())
        self.ts.append(orjson.loads(event.value)["ts"])
        self.partition.append(zlib.crc32(event.key) % self.partitions)

    def end_of_input(self) -> None:
        self.inner.end_of_input()

    def close(self) -> None:
        self.inner.close()


def events_per_event_second(sim: SimulatorConfig) -> float:
    """Events per second of event time in this world (a dry run of its first 5,000 events)."""
    stream = iter(EventStream(sim.model_copy(update={"exposures": None})))
    ts = [orjson.loads(next(stream).value)["ts"] for _ in range(5_000)]
    return len(ts) / ((max(ts) - min(ts)) / 1000.0)


def window_closed_at(sink: RecordingSink, exposure_ts: np.ndarray, close_after_ms: int) -> np.ndarray:
    """Per exposure: the wall time at which the produced sequence moved the joiner's
    watermark (min over partitions of the max ts seen, minus lateness, handled by the
    caller) past ``exposure_ts + close_after_ms``; NaN when it never did."""
    ts = np.asarray(sink.ts, np.int64)
    part = np.asarray(sink.partition)
    running = np.full((sink.partitions, len(ts)), np.iinfo(np.int64).min // 2, np.int64)
    for p in range(sink.partitions):
        mine = np.where(part == p, ts, np.iinfo(np.int64).min // 2)
        running[p] = np.maximum.accumulate(mine)
    watermark = running.min(axis=0)  # non-decreasing
    idx = np.searchsorted(watermark, exposure_ts + close_after_ms, side="right")  # first index with wm > target
    wall = np.asarray(sink.wall)
    out = np.full(len(exposure_ts), np.nan)
    ok = idx < len(wall)
    out[ok] = wall[idx[ok]]
    return out


def _sample_keep_rate(daemon: Daemon, stop: threading.Event, into: list[float]) -> None:
    """The daemon's keep-rate every 0.1 s of the run (its status snapshot, thread-safe)."""
    while not stop.wait(0.1):
        into.append(daemon.status().overload.get("keep_rate", 1.0))


def run(demo: DemoSetup, tmp: Path, sizes: Sizes, *, rate: float, time_scale: float,
        layers: dict[str, Any] | None = None, topic: str = "bench-fresh") -> dict[str, Any]:
    """``layers``: config sections merged over the demo's (e.g. ``overload``), under ``--set``;
    ``topic``: one per run on a shared broker."""
    demo_sim = demo.config(tmp / "fresh", topic).simulator
    # Scale the world's request density so that `rate` events/s is event time at `time_scale`.
    density = events_per_event_second(demo_sim) / demo_sim.requests_per_event_second  # events per request
    requests = rate / (time_scale * density)
    cfg = demo.config(tmp / topic, topic,
                      simulator={"rate": rate, "time_scale": time_scale, "requests_per_event_second": requests,
                                 "exposures": None, "seed": 1}, **(layers or {}))
    kafka, joiner = cfg.kafka, cfg.joiner
    create_topics(kafka.bootstrap_servers, [kafka.topic, kafka.dlq_topic], kafka.partitions)
    stop, sim_stop = threading.Event(), threading.Event()
    clock, polls = StepClock(), PollClock()
    daemon = Daemon(cfg, stop=stop, hooks=clock_hooks(clock, polls))  # built before production starts: start-up is not freshness
    sink = RecordingSink(KafkaSink(kafka.bootstrap_servers, kafka.topic), kafka.partitions)
    produced: dict[int, tuple[float, int, int]] = {}  # sample id -> (produced at, exposure ts, partition)
    sim_stats: dict[str, Any] = {}
    measured: dict[str, Any] = {}
    keep_rates: list[float] = []

    lock = threading.Lock()

    def truth(t: dict[str, Any]) -> None:  # called right after the exposure was sent
        with lock:
            produced[hash_id(t["event_id"])] = (sink.wall[-1], t["ts"], sink.partition[-1])

    def produce() -> None:
        sim_stats.update(run_simulation(cfg.simulator, sink, truth_sink=truth, stop=sim_stop).summary())

    def supervise(t0: float) -> None:
        """Measure the exposures produced in [t0 + warm-up, t0 + run time]; keep producing
        until every one of them is trained (a partial batch only trains once more samples
        come), or a grace period ends (those left are counted as missing); then stop."""
        time.sleep(max(0.0, t0 + sizes.seconds - time.perf_counter()))
        with lock:
            snapshot = list(produced.items())
        wanted = {sid for sid, (at, _, _) in snapshot if at >= t0 + sizes.warmup_s}
        measured.update(ids=set(wanted), end=time.perf_counter())
        deadline, seen, passed = time.perf_counter() + 30.0, 0, -1
        while wanted and time.perf_counter() < deadline:
            time.sleep(0.1)
            with clock.lock:
                fresh, seen = clock.ids[seen:], len(clock.ids)
                last = clock.ends[-1] if clock.ends else t0
            with polls.lock:
                for ids in fresh:
                    wanted.difference_update(ids.tolist())
                    passed = max([passed, *(polls.order.get(i, -1) for i in ids.tolist())])
                # emitted before a trained sample and not trained: dropped by down-sampling
                wanted.difference_update([i for i in wanted if polls.order.get(i, passed + 1) < passed])
            if time.perf_counter() - last > 10.0:
                print(f"  WARNING: no training step for 10 s; {broker_state(demo.broker)}", file=sys.stderr)
                break
        sim_stop.set()
        producer.join()
        stop.set()

    t0 = time.perf_counter()
    producer = threading.Thread(target=produce, name="producer", daemon=True)
    producer.start()
    supervisor = threading.Thread(target=supervise, args=(t0,), name="supervisor", daemon=True)
    supervisor.start()
    sampler = threading.Thread(target=lambda: _sample_keep_rate(daemon, stop, keep_rates), daemon=True)
    sampler.start()
    summary = daemon.run()
    supervisor.join()
    trained = clock.trained_at()
    ids = np.fromiter(sorted(measured["ids"]), np.int64)
    at = np.array([produced[i][0] for i in ids.tolist()])
    ts = np.array([produced[i][1] for i in ids.tolist()], np.int64)
    closed = window_closed_at(sink, ts, joiner.click_window_ms + joiner.allowed_lateness_ms)
    if np.isnan(closed).any():
        raise RuntimeError("production stopped before every measured exposure's window closed")
    done = np.array([i in trained for i in ids.tolist()], bool)
    with polls.lock:
        passed = max((polls.order.get(i, -1) for i in trained), default=-1)
        dropped = np.array([not d and polls.order.get(i, passed + 1) < passed for i, d in zip(ids.tolist(), done)], bool)
    trained_wall = np.array([trained.get(i, np.nan) for i in ids.tolist()])
    emitted = np.array([polls.emitted.get(i, np.nan) for i in ids.tolist()])
    total = trained_wall[done] - at[done]
    wait = closed[done] - at[done]
    pipeline = trained_wall[done] - closed[done]
    join = emitted[done] - closed[done]  # delivery, fetch, poll wait, decode, join
    train = trained_wall[done] - emitted[done]  # batch fill, queue behind earlier steps, the step
    # Check the partitioner assumption against the partition each trained sample came from.
    read_from = clock.partition_of()
    mismatched = sum(read_from[i] != produced[i][2] for i in ids.tolist() if i in read_from)
    if mismatched:
        print(f"  WARNING: {mismatched} exposures were not in the partition assumed for the label-wait "
              "replay: the wait/pipeline split is approximate", file=sys.stderr)
    wall = np.asarray(sink.wall)
    produced_s = wall[-1] - t0
    event_speed = (sink.ts[-1] - sink.ts[0]) / 1000.0 / (wall[-1] - wall[0])
    del daemon, clock, polls
    gc.collect()
    return {
        "rate": rate, "time_scale": time_scale, "requests_per_event_second": requests,
        "events_produced": sim_stats.get("events", 0), "produce_s": produced_s,
        "produced_events_per_s": sim_stats.get("events", 0) / produced_s,
        "event_seconds_per_wall_s": event_speed,
        "window_wall_s": (joiner.click_window_ms + joiner.allowed_lateness_ms) / 1000.0 / event_speed,
        "measured": int(len(ids)), "missing": int((~done & ~dropped).sum()), "dropped": int(dropped.sum()),
        "partition_mismatches": int(mismatched),
        "keep_rate_min": min(keep_rates, default=1.0), "keep_rate_final": keep_rates[-1] if keep_rates else 1.0,
        "samples_trained": summary.samples_trained,
        "checkpoints": summary.checkpoints, "releases": summary.published_versions,
        "freshness_p50_s": pct(total, 50), "freshness_p99_s": pct(total, 99), "freshness_max_s": float(total.max()),
        "label_wait_p50_s": pct(wait, 50), "label_wait_p99_s": pct(wait, 99),
        "pipeline_p50_s": pct(pipeline, 50), "pipeline_p99_s": pct(pipeline, 99),
        "pipeline_max_s": float(pipeline.max()),
        "to_emitted_p50_s": pct(join, 50), "to_emitted_p99_s": pct(join, 99),
        "emitted_to_trained_p50_s": pct(train, 50), "emitted_to_trained_p99_s": pct(train, 99),
        "poll_timeout_s": cfg.trainer.poll_timeout_s, "poll_max_messages": cfg.trainer.poll_max_messages,
    }
