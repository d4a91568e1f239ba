"""End-to-end benchmark of the training daemon on the demo model, beside its baselines.

    python bench/daemon.py [--quick] [--parts throughput freshness checkpoint restart]
                           [--rate EVENTS_PER_S] [--time-scale X] [--rows N] [--set SECTION.FIELD=V ...]

Everything runs on this machine against an embedded broker (Tansu, in memory) that the
benchmark starts itself. The daemon is ``streamtrain.daemon.Daemon`` with the demo's
configuration (``streamtrain.cli.demo_cmd.DEMO_DEFAULTS``: model, embeddings, batch 256,
joiner ``emit_then_correct`` with a 10 min click window, monitors, checkpoint and release
cadence, the default ``trainer.threads``) in a temporary run directory, without Redis (the
demo's tables never evict at this size, so the cold tier would not be touched). ``--set``
overrides any of it (all parts). Four parts:

* **throughput** -- a log of seeded simulator events (the demo world) is produced first;
  the daemon then consumes it as fast as it can: poll -> decode -> join -> fixed-size
  batches -> prequential scoring -> monitors -> train -> releases/checkpoints when due.
  samples/s = samples trained between the end of the first and of the last step / the wall
  time between them (start-up and the shutdown checkpoint left out; the whole run's rate is
  printed too). Baseline: the same batches, captured from the first run, replayed through a
  fresh ``Trainer`` (same config, seed, threads) in a bare ``Trainer.step`` loop -- the
  ceiling, with no Kafka, join, monitors, releases or checkpoints. Daemon and baseline runs
  alternate, best of each (other processes only ever add time); ``ratio`` = ours /
  baseline. ``step_share`` = the part of the daemon's wall time spent inside its
  ``Trainer.step`` calls (prequential observers included), from the same run.
* **freshness** -- the simulator produces in a background thread at a fixed ``--rate``
  while the daemon trains. Per exposure: *produced* (handed to the Kafka producer) ->
  *trained* (the ``Trainer.step`` whose batch held its first, non-correction sample
  returned). The joiner emits a sample only once the event-time watermark (minimum over
  partitions of the newest ts seen, minus ``allowed_lateness_ms``) passes ``ts +
  click_window_ms``; so freshness is split into the *label-window wait* (produced -> the
  producer sent the event that moved that watermark past the window: a floor set by event
  time, replayed from the produced sequence with the producer's partitioner, which is
  checked against the partition of every trained sample) and the *pipeline* part (window
  closed -> trained), itself split at the end of the ``pipeline.poll`` that emitted the
  sample (delivery, fetch, poll wait, decode, join | batch fill, queueing behind earlier
  steps, the step, checkpoint/release stalls). Event time runs ``--time-scale`` times faster
  than wall time, so the 600 s click window lasts 600/time_scale s of wall time; the
  simulated world's request density is scaled so that ``--rate`` events/s *is* that time
  scale. Exposures produced in [warm-up, run time] are measured; production goes on until
  every one of them is trained (a partial batch trains only when more samples come). In
  production (time scale 1) the label wait is the whole window: only the pipeline part
  carries over.
* **checkpoint** -- an ``EmbeddingTable`` of N rows x 64 dims, every row admitted (row-wise
  Adagrad slot, keys, scores), saved through ``CheckpointStore`` with fsync on (state_dict
  copy, safetensors, sha256, manifest, renames) and restored (sha256 verify, safetensors
  read, ``load_state_dict`` with its hash-map rebuild), checked equal. Baselines:
  ``torch.save`` + fsync / ``torch.load(weights_only=True)`` of the same tensors, and a raw
  write + fsync / read of their bytes (the floor). Best of the repeats, median printed too.
  Restores read from the page cache (the files were just written).
* **restart** -- the real CLI (``python -m streamtrain run``, JSON logs at INFO) on a
  pre-produced log with a checkpoint after every batch, SIGKILLed as soon as it has
  committed a few checkpoints, then started again. restart_s = from spawning the second
  process to the end of its first trained batch: the wall time stamped in the manifest of
  the first checkpoint it writes (stamped right after that step, before any file is
  written; if the replay re-commits an identical step the killed process had already
  written, the manifest is reused and the time the new ``LATEST`` was seen is used
  instead). Split at the ``resumed from`` log line. Baseline: spawning
  ``python -c "import streamtrain.daemon"`` (interpreter + imports: the floor of any restart).

``--quick`` runs smaller sizes and says so: 12k samples, an 8 s freshness run, 100k rows,
one repeat of the throughput pair. The timings are made by wrapping the daemon's
``trainer.step`` and ``pipeline.poll`` on the instance (``StepClock``, ``PollClock``): the
public hooks do not mark "trained" (observers fire before the backward pass, ``on_step``
after a checkpoint that fell due). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import calendar
import gc
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

# `python bench/daemon.py` puts bench/ first on sys.path, where a sibling script can shadow a
# package of the same name (bench/monitors.py vs the `monitors` package): drop it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import numpy as np  # noqa: E402
import orjson  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from checkpoints import CheckpointStore  # noqa: E402
from checkpoints.config import CheckpointConfig  # noqa: E402
from consumers.schema import hash_id  # noqa: E402
from streamtrain.cli.demo_cmd import DEMO_DEFAULTS  # noqa: E402
from streamtrain.config import StreamtrainConfig, build_config, flag_overrides  # noqa: E402
from streamtrain.daemon import Daemon  # noqa: E402
from streamtrain.embedding import AdmissionConfig, EmbeddingTable, EmbeddingTableConfig, EvictionConfig  # noqa: E402
from streamtrain.embedding.hashing import mix64  # noqa: E402
from streamtrain.services import EmbeddedBroker  # noqa: E402
from streamtrain.services.topics import create_topics  # noqa: E402
from streamtrain.simulator import EventStream, KafkaSink, SimEvent, SimulatorConfig, run_simulation  # noqa: E402
from streamtrain.trainer import Trainer  # noqa: E402

PARTS = ("throughput", "freshness", "checkpoint", "restart")
SIZES = {
    # throughput: exposures in the pre-produced log, interleaved daemon/baseline repeats;
    # freshness: seconds of production measured and the leading seconds left out (start-up);
    # checkpoint: table rows, repeats; restart: log size, checkpoints before the SIGKILL,
    # repeats of the import floor.
    "quick": {"tput_exposures": 16_000, "tput_repeats": 1, "fresh_seconds": 8.0, "fresh_warmup_s": 2.0,
              "ckpt_rows": 100_000, "ckpt_repeats": 2, "restart_exposures": 6_000, "restart_kill_after": 2,
              "floor_repeats": 1},
    "full": {"tput_exposures": 100_000, "tput_repeats": 2, "fresh_seconds": 60.0, "fresh_warmup_s": 5.0,
             "ckpt_rows": 1_000_000, "ckpt_repeats": 3, "restart_exposures": 15_000, "restart_kill_after": 4,
             "floor_repeats": 3},
}
DIM = 64
OVERRIDES: dict[str, Any] = {}  # --set, applied last to every daemon config


# ---------------------------------------------------------------------------- helpers
def demo_config(run_dir: Path, bootstrap: str, topic: str, **layers: Any) -> StreamtrainConfig:
    """DEMO_DEFAULTS with its own run dir and topic (``layers``: extra sections, merged)."""
    services = {"run_dir": str(run_dir),
                "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "dlq_topic": f"{topic}.dlq"}}
    return build_config(DEMO_DEFAULTS, services, layers, OVERRIDES)


def broker_state(broker: EmbeddedBroker) -> str:
    """For error messages: is the broker process still there, and in which state."""
    if broker.pid is None:
        return "broker not running"
    try:
        with open(f"/proc/{broker.pid}/status") as f:
            state = next((line.split(None, 1)[1].strip() for line in f if line.startswith("State:")), "?")
    except OSError:
        return f"broker pid {broker.pid} is gone (log {broker.log_path})"
    return f"broker pid {broker.pid} state {state} (log {broker.log_path})"


def produce_log(cfg: StreamtrainConfig, exposures: int) -> dict[str, Any]:
    """A seeded log of the demo world, produced as fast as possible."""
    kafka = cfg.kafka
    create_topics(kafka.bootstrap_servers, [kafka.topic, kafka.dlq_topic], kafka.partitions)
    sim = cfg.simulator.model_copy(update={"rate": 0.0, "time_scale": 0.0, "exposures": exposures})
    return run_simulation(sim, KafkaSink(kafka.bootstrap_servers, kafka.topic)).summary()


class StepClock:
    """Times every training step of a daemon by wrapping its trainer's ``step`` on the instance.

    Neither public hook marks "trained": observers fire between the forward and the backward
    pass, and ``on_step`` only after a checkpoint that fell due on that step. Records the
    end time, the duration and the (non-correction) sample ids and partitions of every
    step; with ``keep_batches`` also a copy of every batch (the baseline replays them).
    The daemon calls ``self.trainer.step(batch, observe)``, so the wrapper sees exactly
    what it trains, observers included.
    """

    def __init__(self, trainer: Trainer, *, keep_batches: bool = False) -> None:
        self._inner = trainer.step
        self.keep_batches = keep_batches
        self.lock = threading.Lock()
        self.ends: list[float] = []
        self.durations: list[float] = []
        self.ids: list[np.ndarray] = []
        self.partitions: list[np.ndarray] = []
        self.batches: list[dict[str, np.ndarray]] = []
        trainer.step = self  # type: ignore[method-assign]

    def __call__(self, batch: dict[str, np.ndarray], observe: Callable[..., None] | None = None) -> dict[str, float]:
        start = time.perf_counter()
        losses = self._inner(batch, observe)
        end = time.perf_counter()
        with self.lock:
            self.ends.append(end)
            self.durations.append(end - start)
            first = ~batch["is_correction"]
            self.ids.append(batch["sample_id"][first].copy())
            self.partitions.append(batch["partition"][first].copy())
            if self.keep_batches:
                self.batches.append({k: np.array(v, copy=True) for k, v in batch.items()})
        return losses

    def partition_of(self) -> dict[int, int]:
        """sample id -> the Kafka partition its exposure was read from."""
        with self.lock:
            return {sid: p for ids, parts in zip(self.ids, self.partitions)
                    for sid, p in zip(ids.tolist(), parts.tolist())}

    def trained_at(self) -> dict[int, float]:
        """sample id -> end time of the step that first trained it."""
        with self.lock:
            out: dict[int, float] = {}
            for end, ids in zip(self.ends, self.ids):
                for sid in ids.tolist():
                    out.setdefault(sid, end)
            return out


class PollClock:
    """Times when the joiner emits each sample, by wrapping ``daemon.pipeline.poll`` on the
    instance (consume -> decode -> join -> finished samples): sample id -> end of that poll."""

    def __init__(self, pipeline: Any) -> None:
        self._inner = pipeline.poll
        self.lock = threading.Lock()
        self.emitted: dict[int, float] = {}
        pipeline.poll = self

    def __call__(self, *args: Any, **kwargs: Any) -> list[dict[str, np.ndarray]]:
        batches = self._inner(*args, **kwargs)
        end = time.perf_counter()
        with self.lock:
            for b in batches:
                for sid in b["sample_id"][~b["is_correction"]].tolist():
                    self.emitted.setdefault(sid, end)
        return batches


class CallTimer:
    """Wraps ``obj.<name>`` on the instance; records the (start, end) of every call."""

    def __init__(self, obj: Any, name: str) -> None:
        self._inner = getattr(obj, name)
        self.spans: list[tuple[float, float]] = []
        setattr(obj, name, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.spans.append((start, time.perf_counter()))

    def within(self, lo: float, hi: float) -> float:
        """Seconds spent in calls, clipped to [lo, hi]."""
        return sum(max(0.0, min(end, hi) - max(start, lo)) for start, end in self.spans)


def watchdog(stop: threading.Event, clock: StepClock, idle_s: float) -> threading.Thread:
    """Stop the daemon if no step ends for ``idle_s`` (the log ran dry before the stop point)."""

    def watch() -> None:
        started = time.perf_counter()
        while not stop.wait(0.5):
            with clock.lock:
                last = clock.ends[-1] if clock.ends else started
            if time.perf_counter() - last > idle_s:
                print(f"  (watchdog: no step for {idle_s:.0f} s, stopping the daemon)", file=sys.stderr)
                stop.set()

    thread = threading.Thread(target=watch, name="watchdog", daemon=True)
    thread.start()
    return thread


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- throughput
def daemon_pass(cfg: StreamtrainConfig, target: int, keep_batches: bool) -> tuple[dict[str, Any], StepClock]:
    """One daemon from a fresh run dir over the whole log, up to ``target`` samples."""
    stop = threading.Event()
    daemon = Daemon(cfg, stop=stop, stop_after_samples=target)
    clock = StepClock(daemon.trainer, keep_batches=keep_batches)
    # Where the rest of the loop's time goes (none of these overlap Trainer.step).
    timers = {"poll": CallTimer(daemon.pipeline, "poll"),  # consume, decode, join, DLQ
              "checkpoint": CallTimer(daemon, "checkpoint"),
              "release": CallTimer(daemon.releases, "after_step")}  # shadow copy + publish when due
    watchdog(stop, clock, idle_s=20.0)
    started = time.perf_counter()
    summary = daemon.run()
    wall = time.perf_counter() - started
    stop.set()
    ends = np.array(clock.ends)
    if len(ends) < 3:
        raise RuntimeError(f"throughput run trained only {len(ends)} steps")
    batch = cfg.trainer.batch_size
    window = ends[-1] - ends[0]  # end of the first step -> end of the last one
    step_share = float(np.sum(clock.durations[1:])) / window
    shares = {"train_step": step_share} | {k: t.within(ends[0], ends[-1]) / window for k, t in timers.items()}
    shares["other"] = 1.0 - sum(shares.values())
    out = {"samples_per_s": batch * (len(ends) - 1) / window, "step_share": step_share, "shares": shares,
           "step_ms": 1000 * float(np.median(clock.durations)), "run_wall_s": wall,
           "run_samples_per_s": summary.samples_trained / wall, "samples_trained": summary.samples_trained,
           "steps": summary.steps, "checkpoints": summary.checkpoints, "releases": summary.published_versions}
    del daemon
    return out, clock


def bare_pass(cfg: StreamtrainConfig, batches: list[dict[str, np.ndarray]]) -> float:
    """samples/s of a fresh Trainer (same config, seed, threads) stepping through ``batches``."""
    torch.set_num_threads(cfg.trainer.threads)
    tables = {name: getattr(cfg.embeddings, name) for name in ("item", "user", "sparse")}
    trainer = Trainer(cfg.model, tables, learning_rate=cfg.trainer.learning_rate, seed=cfg.trainer.seed,
                      device=torch.device("cpu"))
    ends = []
    for batch in batches:
        trainer.step(batch, None)
        ends.append(time.perf_counter())
    return cfg.trainer.batch_size * (len(ends) - 1) / (ends[-1] - ends[0])


def bench_throughput(broker: EmbeddedBroker, tmp: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    exposures = sizes["tput_exposures"]
    produced = produce_log(demo_config(tmp / "tput", broker.bootstrap_servers, "bench-tput"), exposures)
    batch = DEMO_DEFAULTS["trainer"]["batch_size"]
    # The last click window of event time (~2,800 exposures of the demo world) never
    # closes: stop safely before it, at a batch boundary.
    target = (exposures - 4_000) // batch * batch
    ours: list[dict[str, Any]] = []
    bare: list[float] = []
    batches: list[dict[str, np.ndarray]] = []
    for r in range(sizes["tput_repeats"]):  # interleaved: background load lands on both alike
        cfg = demo_config(tmp / f"tput-{r}", broker.bootstrap_servers, "bench-tput")
        result, clock = daemon_pass(cfg, target, keep_batches=r == 0)
        ours.append(result)
        batches = batches or clock.batches
        del clock
        gc.collect()
        bare.append(bare_pass(cfg, batches))  # the batches the daemon trained, captured from the first run
        gc.collect()
    best = max(ours, key=lambda o: o["samples_per_s"])
    hist = [float(b["hist_len"].mean()) for b in batches]
    return {
        **best, "repeats": len(ours), "all_samples_per_s": [o["samples_per_s"] for o in ours],
        "exposures_produced": produced["exposures"], "events_produced": produced["events"],
        "baseline_samples_per_s": max(bare), "all_baseline_samples_per_s": bare,
        "ratio": best["samples_per_s"] / max(bare), "threads": cfg.trainer.threads,
        "mean_hist_len": float(np.mean(hist)), "last_hist_len": float(np.mean(hist[-10:])),
    }


# ---------------------------------------------------------------------------- freshness
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


def bench_freshness(broker: EmbeddedBroker, tmp: Path, sizes: dict[str, Any], rate: float,
                    time_scale: float) -> dict[str, Any]:
    base = demo_config(tmp / "fresh", broker.bootstrap_servers, "bench-fresh")
    demo_sim = base.simulator
    # Scale the world's request density so that `rate` events/s is event time at `time_scale`.
    density = events_per_event_second(demo_sim) / demo_sim.requests_per_event_second  # events per request
    requests = rate / (time_scale * density)
    cfg = demo_config(tmp / "fresh", broker.bootstrap_servers, "bench-fresh",
                      simulator={"rate": rate, "time_scale": time_scale, "requests_per_event_second": requests,
                                 "exposures": None, "seed": 1})
    kafka, joiner = cfg.kafka, cfg.joiner
    create_topics(kafka.bootstrap_servers, [kafka.topic, kafka.dlq_topic], kafka.partitions)
    stop, sim_stop = threading.Event(), threading.Event()
    daemon = Daemon(cfg, stop=stop)  # built before production starts: start-up is not freshness
    clock = StepClock(daemon.trainer)
    polls = PollClock(daemon.pipeline)
    sink = RecordingSink(KafkaSink(kafka.bootstrap_servers, kafka.topic), kafka.partitions)
    produced: dict[int, tuple[float, int, int]] = {}  # sample id -> (produced at, exposure ts, partition)
    sim_stats: dict[str, Any] = {}
    measured: dict[str, Any] = {}

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
        time.sleep(max(0.0, t0 + sizes["fresh_seconds"] - time.perf_counter()))
        with lock:
            snapshot = list(produced.items())
        wanted = {sid for sid, (at, _, _) in snapshot if at >= t0 + sizes["fresh_warmup_s"]}
        measured.update(ids=set(wanted), end=time.perf_counter())
        deadline, seen = time.perf_counter() + 30.0, 0
        while wanted and time.perf_counter() < deadline:
            time.sleep(0.1)
            with clock.lock:
                fresh, seen = clock.ids[seen:], len(clock.ids)
                last = clock.ends[-1] if clock.ends else t0
            for ids in fresh:
                wanted.difference_update(ids.tolist())
            if time.perf_counter() - last > 10.0:
                print(f"  WARNING: no training step for 10 s; {broker_state(broker)}", file=sys.stderr)
                break
        sim_stop.set()
        producer.join()
        stop.set()

    t0 = time.perf_counter()
    producer = threading.Thread(target=produce, name="producer", daemon=True)
    producer.start()
    supervisor = threading.Thread(target=supervise, args=(t0,), name="supervisor", daemon=True)
    supervisor.start()
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
        "measured": int(len(ids)), "missing": int((~done).sum()), "partition_mismatches": int(mismatched),
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


# ---------------------------------------------------------------------------- checkpoint
def filled_table(rows: int) -> EmbeddingTable:
    """A table with ``rows`` keys admitted (one training step, no gradients)."""
    cfg = EmbeddingTableConfig(name="bench", dim=DIM, initial_rows=rows, max_rows=rows,
                               admission=AdmissionConfig(min_count=1),
                               eviction=EvictionConfig(policy="none", every_n_steps=0))
    table = EmbeddingTable(cfg)
    keys = (mix64(torch.arange(1, rows + 1, dtype=torch.int64)) & ((1 << 63) - 1)) | 1
    for chunk in keys.split(1 << 17):
        table.lookup(chunk, train=True, now_ms=0)
    table.apply_gradients([])
    if table.size != rows:
        raise RuntimeError(f"admitted {table.size} keys, wanted {rows}")
    return table


def bench_checkpoint(tmp: Path, rows: int, repeats: int) -> dict[str, Any]:
    table = filled_table(rows)
    root = tmp / "ckpt"
    names = ("state_dict", "store_save", "store_load", "load_state_dict",
             "torch_save", "torch_load", "raw_write", "raw_read")
    times: dict[str, list[float]] = {k: [] for k in names}
    nbytes = 0
    with CheckpointStore(root, CheckpointConfig(root=root, fsync=True, keep_last=repeats + 1)) as store:
        for r in range(repeats):
            # ours: copy the state, write it atomically (fsync, sha256, manifest), read it back
            t = time.perf_counter()
            state = table.state_dict()
            t1 = time.perf_counter()
            info = store.save(r + 1, {"table": state}, offsets={}, watermark=None, config_hash="bench-daemon")
            t2 = time.perf_counter()
            times["state_dict"].append(t1 - t)
            times["store_save"].append(t2 - t1)
            nbytes = sum(f.bytes for f in info.manifest.files)
            tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            fresh = EmbeddingTable(table.config)  # the daemon builds its tables before restoring
            t = time.perf_counter()
            ckpt = store.load(info.name)
            t1 = time.perf_counter()
            fresh.load_state_dict(ckpt.components["table"])
            t2 = time.perf_counter()
            times["store_load"].append(t1 - t)
            times["load_state_dict"].append(t2 - t1)
            if not torch.equal(fresh.weight, table.weight) or fresh.size != table.size:
                raise RuntimeError("restored table differs from the saved one")
            del ckpt, fresh
            gc.collect()

            # baseline: torch.save + fsync of the same tensors, torch.load(weights_only=True)
            path = tmp / f"torch-{r}.pt"
            t = time.perf_counter()
            torch.save(tensors, path)
            fsync_path(path)
            fsync_path(tmp)
            times["torch_save"].append(time.perf_counter() - t)
            t = time.perf_counter()
            loaded = torch.load(path, weights_only=True)
            times["torch_load"].append(time.perf_counter() - t)
            del loaded
            path.unlink()

            # floor: the tensors' bytes back to back in one file, write + fsync; read them
            # into fresh tensors
            path = tmp / f"raw-{r}.bin"
            t = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for v in tensors.values():
                    view = memoryview(v.contiguous().view(torch.uint8).numpy().reshape(-1))
                    while view:
                        view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_path(tmp)
            times["raw_write"].append(time.perf_counter() - t)
            t = time.perf_counter()
            back = {}
            with open(path, "rb", buffering=0) as f:
                for k, v in tensors.items():
                    back[k] = torch.empty_like(v)
                    f.readinto(memoryview(back[k].view(torch.uint8).numpy().reshape(-1)))
            times["raw_read"].append(time.perf_counter() - t)
            del back, state, tensors
            path.unlink()
            gc.collect()
    best = {k: min(v) for k, v in times.items()}
    median = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "rows": rows, "dim": DIM, "bytes": nbytes, "repeats": repeats,
        "ckpt_save_s": best["state_dict"] + best["store_save"],
        "ckpt_restore_s": best["store_load"] + best["load_state_dict"],
        "ckpt_save_median_s": median["state_dict"] + median["store_save"],
        "ckpt_restore_median_s": median["store_load"] + median["load_state_dict"],
        "torch_save_s": best["torch_save"], "torch_load_s": best["torch_load"],
        "raw_write_s": best["raw_write"], "raw_read_s": best["raw_read"],
        "parts_best_s": best, "parts_median_s": median,
    }


# ---------------------------------------------------------------------------- restart
def cli_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "streamtrain", "--log-format", "json", "--log-level", "INFO", "run",
            "--config", str(config)]


def read_latest(root: Path) -> str | None:
    try:
        return (root / "LATEST").read_text().strip() or None
    except FileNotFoundError:
        return None


def log_time(log: Path, prefix: str) -> float | None:
    """Unix time of the first JSON log line whose message starts with ``prefix``."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and str(doc.get("msg", "")).startswith(prefix):
            stamp, _, ms = doc["ts"].rstrip("Z").partition(".")  # UTC, millisecond resolution
            return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000.0
    return None


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def bench_restart(broker: EmbeddedBroker, tmp: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    run_dir = tmp / "restart"
    # A checkpoint after every batch: the first checkpoint after the restart marks the end
    # of the first trained batch.
    layers = {"checkpoints": {"every_samples": DEMO_DEFAULTS["trainer"]["batch_size"], "every_seconds": None}}
    cfg = demo_config(run_dir, broker.bootstrap_servers, "bench-restart", **layers)
    produce_log(cfg, sizes["restart_exposures"])
    config_path = tmp / "restart.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))  # the effective config, every key explicit
    root = cfg.checkpoints.root
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    first_log, second_log = tmp / "restart-1.log", tmp / "restart-2.log"
    with open(first_log, "wb") as out:
        proc = subprocess.Popen(cli_command(config_path), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            latest = read_latest(root)
            if latest is not None and int(latest.split("-")[1]) >= sizes["restart_kill_after"]:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the first daemon did not checkpoint:\n{first_log.read_text()[-2000:]}")
            time.sleep(0.005)
        proc.kill()  # SIGKILL
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = read_latest(root)
    assert killed_at is not None

    spawned = time.time()
    with open(second_log, "wb") as out:
        proc = subprocess.Popen(cli_command(config_path), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while (latest := read_latest(root)) in (None, killed_at):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the restarted daemon did not train:\n{second_log.read_text()[-2000:]}")
            time.sleep(0.002)
        seen = time.time()
        manifest = json.loads((root / latest / "MANIFEST.json").read_text())
    finally:
        stop_process(proc)
    trained = manifest["wall_time"] if manifest["wall_time"] >= spawned else seen
    resumed = log_time(second_log, "resumed from")

    # Baseline: the interpreter and the daemon's imports, nothing else.
    floors = []
    for _ in range(sizes["floor_repeats"]):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import streamtrain.daemon"], check=True, env=env)
        floors.append(time.perf_counter() - t)
    return {
        "killed_at": killed_at, "resumed_at": latest, "restart_s": trained - spawned,
        "spawn_to_resumed_s": (resumed - spawned) if resumed else None,
        "resumed_to_trained_s": (trained - resumed) if resumed else None,
        "latest_seen_s": seen - spawned, "manifest_reused": manifest["wall_time"] < spawned,
        "baseline_import_s": min(floors),
    }


# ---------------------------------------------------------------------------- report
def row(label: str, *cells: str, width: int = 46) -> None:
    print(f"  {label:<{width}}" + "".join(f"{c:>11}" for c in cells))


def report(results: dict[str, Any], sizes: dict[str, Any], quick: bool) -> None:
    line = "-" * 78
    if quick:
        print(f"QUICK MODE: smaller sizes than the full run ({sizes}); figures are indicative only.")
    if (r := results.get("throughput")) is not None:
        print(line)
        print(f"throughput: demo model, pre-produced log of {r['exposures_produced']:,} exposures "
              f"({r['events_produced']:,} events), {r['samples_trained']:,} samples trained in "
              f"{r['steps']} steps of 256; mean history length {r['mean_hist_len']:.1f} (last batches "
              f"{r['last_hist_len']:.1f}); {r['checkpoints']} checkpoint(s), {r['releases']} release(s); "
              f"torch threads {r['threads']}; best of {r['repeats']}")
        row("", "samples/s", "ms/step")
        for label, rate in (("daemon, end to end (ours)", r["samples_per_s"]),
                            ("bare Trainer.step loop (baseline)", r["baseline_samples_per_s"])):
            row(label, f"{rate:,.0f}", f"{1000 * 256 / rate:.1f}")
        shares = ", ".join(f"{k} {100 * v:.1f} %" for k, v in r["shares"].items())
        print(f"  ratio ours/baseline {r['ratio']:.2f}; daemon wall time: {shares}; median Trainer.step in the "
              f"daemon {r['step_ms']:.1f} ms; whole run incl. start-up and final checkpoint "
              f"{r['run_samples_per_s']:,.0f} samples/s; all repeats: ours "
              + " / ".join(f"{v:,.0f}" for v in r["all_samples_per_s"]) + ", baseline "
              + " / ".join(f"{v:,.0f}" for v in r["all_baseline_samples_per_s"]))
    if (r := results.get("freshness")) is not None:
        print(line)
        print(f"freshness: {r['produced_events_per_s']:,.0f} events/s produced for {r['produce_s']:.0f} s "
              f"(--rate {r['rate']:g}), event time x{r['event_seconds_per_wall_s']:,.0f} -> click window + "
              f"lateness = {r['window_wall_s']:.2f} s of wall time; {r['measured']:,} exposures measured, "
              f"{r['missing']} never trained; {r['checkpoints']} checkpoint(s), {r['releases']} release(s)")
        row("", "p50 s", "p99 s")
        for label, key in (("exposure produced -> trained (ours)", "freshness"),
                           ("  of which label-window wait (floor)", "label_wait"),
                           ("  window closed -> trained (pipeline)", "pipeline"),
                           ("    closed -> emitted by the joiner", "to_emitted"),
                           ("    emitted -> trained", "emitted_to_trained")):
            row(label, f"{r[key + '_p50_s']:.3f}", f"{r[key + '_p99_s']:.3f}")
    if (r := results.get("checkpoint")) is not None:
        p = r["parts_best_s"]
        print(line)
        print(f"checkpoint: one table of {r['rows']:,} rows x {r['dim']} (weights + Adagrad slot + keys/scores), "
              f"{r['bytes'] / 2**20:,.0f} MiB on disk, fsync on, best of {r['repeats']} "
              f"(median save {r['ckpt_save_median_s']:.2f} s, restore {r['ckpt_restore_median_s']:.2f} s)")
        row("", "save s", "restore s")
        row("CheckpointStore (ours)", f"{r['ckpt_save_s']:.3f}", f"{r['ckpt_restore_s']:.3f}")
        row("  state_dict copy | store.load (sha256, read)", f"{p['state_dict']:.3f}", f"{p['store_load']:.3f}")
        row("  store.save | load_state_dict (copy, index)", f"{p['store_save']:.3f}", f"{p['load_state_dict']:.3f}")
        row("torch.save+fsync | torch.load (baseline)", f"{r['torch_save_s']:.3f}", f"{r['torch_load_s']:.3f}")
        row("raw bytes write+fsync | read (floor)", f"{r['raw_write_s']:.3f}", f"{r['raw_read_s']:.3f}")
    if (r := results.get("restart")) is not None:
        print(line)
        print(f"restart after SIGKILL: `python -m streamtrain run` killed after {r['killed_at']}, restarted; "
              f"first trained batch -> {r['resumed_at']}")
        row("", "s")
        row("spawn -> first trained batch (ours)", f"{r['restart_s']:.2f}")
        if r["spawn_to_resumed_s"] is not None:
            row("  spawn -> 'resumed from' log line", f"{r['spawn_to_resumed_s']:.2f}")
            row("  'resumed from' -> first trained batch", f"{r['resumed_to_trained_s']:.2f}")
        row("python -c 'import streamtrain.daemon' (floor)", f"{r['baseline_import_s']:.2f}")
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, < 1 minute")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="freshness: events per wall second (default 2000, the demo's)")
    parser.add_argument("--time-scale", type=float, default=1000.0,
                        help="freshness: event seconds per wall second (default 1000: the 10 min click window "
                             "lasts 0.6 s)")
    parser.add_argument("--rows", type=int, default=None, help="checkpoint: table rows (default 1M, quick 100k)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a daemon config value on top of DEMO_DEFAULTS (repeatable; printed in the JSON)")
    args = parser.parse_args()
    OVERRIDES.update(flag_overrides(args.overrides))
    sizes = dict(SIZES["quick" if args.quick else "full"])
    if args.rows:
        sizes["ckpt_rows"] = args.rows

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp_dir:
        tmp = Path(tmp_dir)
        if "checkpoint" in args.parts:
            results["checkpoint"] = bench_checkpoint(tmp, sizes["ckpt_rows"], sizes["ckpt_repeats"])
            gc.collect()
        if set(args.parts) - {"checkpoint"}:
            with EmbeddedBroker() as broker:
                try:
                    if "throughput" in args.parts:
                        results["throughput"] = bench_throughput(broker, tmp, sizes)
                    if "freshness" in args.parts:
                        results["freshness"] = bench_freshness(broker, tmp, sizes, args.rate, args.time_scale)
                    if "restart" in args.parts:
                        results["restart"] = bench_restart(broker, tmp, sizes)
                except BaseException:
                    print(f"failed; {broker_state(broker)}", file=sys.stderr)
                    raise
                gc.collect()  # drop Kafka clients before the broker goes
    report(results, sizes, args.quick)

    t, f, c, r = (results.get(k, {}) for k in PARTS)
    rnd = lambda v, n=3: None if v is None else round(float(v), n)  # noqa: E731
    print(json.dumps({
        "benchmark": "daemon", "quick": args.quick, "overrides": args.overrides,
        "samples_per_s": rnd(t.get("samples_per_s"), 1),
        "baseline_samples_per_s": rnd(t.get("baseline_samples_per_s"), 1),
        "ratio": rnd(t.get("ratio")), "step_share": rnd(t.get("step_share")),
        "daemon_time_shares": {k: rnd(v) for k, v in t.get("shares", {}).items()} or None,
        "freshness_p50_s": rnd(f.get("freshness_p50_s")), "freshness_p99_s": rnd(f.get("freshness_p99_s")),
        "label_wait_p50_s": rnd(f.get("label_wait_p50_s")), "label_wait_p99_s": rnd(f.get("label_wait_p99_s")),
        "pipeline_p50_s": rnd(f.get("pipeline_p50_s")), "pipeline_p99_s": rnd(f.get("pipeline_p99_s")),
        "to_emitted_p50_s": rnd(f.get("to_emitted_p50_s")), "to_emitted_p99_s": rnd(f.get("to_emitted_p99_s")),
        "freshness_missing": f.get("missing"), "produced_events_per_s": rnd(f.get("produced_events_per_s"), 1),
        "ckpt_save_s": rnd(c.get("ckpt_save_s")), "ckpt_restore_s": rnd(c.get("ckpt_restore_s")),
        "torch_save_s": rnd(c.get("torch_save_s")), "torch_load_s": rnd(c.get("torch_load_s")),
        "raw_write_s": rnd(c.get("raw_write_s")), "raw_read_s": rnd(c.get("raw_read_s")),
        "restart_s": rnd(r.get("restart_s")), "restart_to_resumed_s": rnd(r.get("spawn_to_resumed_s")),
        "baseline_import_s": rnd(r.get("baseline_import_s")),
        "sizes": {"tput_samples": t.get("samples_trained"), "tput_exposures": t.get("exposures_produced"),
                  "fresh_rate": f.get("rate"), "fresh_time_scale": f.get("time_scale"),
                  "fresh_seconds": sizes["fresh_seconds"] if f else None, "fresh_measured": f.get("measured"),
                  "ckpt_rows": c.get("rows"), "ckpt_dim": c.get("dim"), "ckpt_bytes": c.get("bytes"),
                  "restart_exposures": sizes["restart_exposures"] if r else None},
        "machine": {"cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "torch": torch.__version__, "torch_threads": t.get("threads"),
                    "cuda": torch.cuda.is_available(), "loadavg": [round(x, 2) for x in os.getloadavg()]},
    }))


if __name__ == "__main__":
    main()
