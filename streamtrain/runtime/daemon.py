"""The training daemon: the one place that wires consumers, trainer, monitors, checkpoints,
releases, metrics and the control endpoint together.

Loop, one turn per poll::

    poll Kafka -> decode/join -> samples  ->  SampleBuffer (fixed-size batches)
                          -> DownSampler (overload: keeps positives + a share of negatives)
    for each full batch:  trainer.step -> StepResult (prequential scores, losses)
                          -> monitors, shadow window, hooks -> ledger
                          -> release due?  checkpoint this step, then publish naming it
                          -> else checkpoint if due
    status snapshot -> /status, /metrics, live view, run history (timeseries/)

The flow is one-way: the trainer returns what observers need and calls nobody; the
runtime hands it to the monitors, the releases and the hooks.

Exactly-once (DESIGN §6.1). A checkpoint is cut between two training steps and holds,
together: the trainer (dense weights, Adam, tables, RNG), the pipeline (joiner state), the
samples emitted but not yet trained (the buffer), the monitors and gate, the releases
(cadence, shadow window, a pending release), and the ledger of sample ids trained since
the previous checkpoint; its manifest holds the Kafka positions of everything the
pipeline consumed (the one place offsets are stored). Restarting seeks every partition to
those positions: every message is either reflected in the saved state or re-read, never
both. Batch boundaries depend only on the sample sequence, which the joiner makes
independent of arrival timing, so a replay reproduces the uninterrupted run bit for bit
on CPU.

Overload (``runtime/overload.py``): when the backlog is long and growing, the keep-rate of
unclicked exposures drops (weighted ``1 / rate`` in the losses). The rate changes only while a
checkpoint is cut and is saved in it, and which rows it drops is a function of their ids, so
the exactly-once argument above holds with down-sampling active.

Shutdown (SIGTERM / Ctrl-C): stop polling, finish the current step, write a final
checkpoint, commit offsets to Kafka (for lag tools only), close. A second signal exits
at once (``stop_event_on_signals``).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch

from checkpoints import (
    Checkpoint,
    CheckpointNotFoundError,
    CheckpointStore,
    CheckpointTrigger,
    CheckpointWriteError,
    NoIntactCheckpointError,
    ledger_ids,
    ledger_state,
)
from consumers.batching import SampleBuffer
from consumers.joiner import NO_WATERMARK
from consumers.pipeline import IngestPipeline
from consumers.ratelimit import RateLimitedLog
from consumers.runtime import build_pipeline, make_producer
from consumers.schema import SampleBatch
from monitors.alerts import build_sinks
from monitors.suite import MonitorSuite
from monitors.verdict import Verdict
from streamtrain.config import StreamtrainConfig
from streamtrain.embedding.redis_tier import redis_cold_tiers
from streamtrain.runtime.control import ControlServer, ensure_token
from streamtrain.runtime.metric_points import metric_points
from streamtrain.runtime.metrics import DaemonMetrics
from streamtrain.runtime.overload import Backlog, BacklogMeter, DownSampler, KeptBatch, next_rate
from streamtrain.runtime.publisher import Publisher
from streamtrain.runtime.releases import ReleaseManager
from streamtrain.runtime.serving import ServingPush
from streamtrain.runtime.status import DaemonStatus, TableStatus, VersionStatus
from streamtrain.runtime.timeseries import TimeSeries
from streamtrain.trainer import Predictions, StepResult, Trainer, build_trainer, pick_device

log = logging.getLogger("streamtrain.daemon")


def _no_polled(batches: list[SampleBatch], seconds: float) -> None:
    return None


def _no_trained(batch: SampleBatch, result: StepResult) -> None:
    return None


@dataclass(frozen=True)
class DaemonHooks:
    """Observers attached from outside (benchmarks, the demo's trackers), called on the
    training thread. They may read what they are given; they must not change it or block.

    * ``on_polled(batches, seconds)``: after each ``pipeline.poll``, with the samples it
      emitted (possibly none) and how long the poll took.
    * ``on_trained(batch, result)``: right after each training step returned, before the
      monitors, releases and checkpoint of that step.
    """

    on_polled: Callable[[list[SampleBatch], float], None] = _no_polled
    on_trained: Callable[[SampleBatch, StepResult], None] = _no_trained


class ShuttingDown(RuntimeError):
    """A control command that came after the training loop ended (the endpoint answers 503)."""


@dataclass
class RunSummary:
    samples_trained: int
    steps: int
    checkpoints: int
    checkpoint_failures: int
    published_versions: int
    gate: str
    auc: float | None
    stopped_by: str


class Daemon:
    def __init__(
        self,
        config: StreamtrainConfig,
        *,
        stop: threading.Event,
        resume_from: str | None = None,
        warm_start: str | None = None,
        stop_after_samples: int | None = None,
        hooks: DaemonHooks = DaemonHooks(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stop = stop
        self.stop_after_samples = stop_after_samples
        self.hooks = hooks
        self._clock = clock
        self._commands: queue.Queue[tuple[str, str, Future[dict[str, Any]]]] = queue.Queue()
        self._accepting = True  # False once the loop ended: control commands are refused
        self._status_lock = threading.Lock()
        self._status = DaemonStatus(state="starting", topic=config.kafka.topic)
        self.checkpoints_written = 0
        self.checkpoint_failures = 0
        self.dead_polls = 0  # polls whose messages mostly went to the DLQ
        self._dead_poll_log = RateLimitedLog(30.0, clock, log)
        self.last_checkpoint: str | None = None
        self._last_checkpoint_wall: float | None = None
        self._losses: dict[str, float] = {}
        # Ledger of the exactly-once proof: ids trained since the last checkpoint, and the
        # ledger that checkpoint holds (re-saving the same step must repeat it, since the
        # store links a same-step re-save to that checkpoint's parent).
        self._ledger: list[np.ndarray] = []
        self._saved_ledger = np.zeros(0, np.int64)
        self._saved_step: int | None = None
        self._started = clock()

        torch.set_num_threads(config.trainer.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = pick_device(config.trainer.device)
        self.trainer = self._new_trainer()
        self.monitors = MonitorSuite(config.monitors, config.features.sparse, config.features.dense,
                                     sinks=build_sinks(config.monitors.alerts))
        self.buffer = SampleBuffer(config.trainer.batch_size)
        overload = config.overload
        # mode=off: batches go from the buffer to the trainer untouched (no component, no state)
        self.downsampler = None if overload.mode == "off" else DownSampler(
            config.trainer.batch_size, overload.keep_rate if overload.mode == "fixed" else 1.0)
        self.backlog_meter = BacklogMeter(overload.window_s)
        self.backlog: Backlog | None = None  # the last measurement (status, metrics, the lag alarm)
        self.lag_alarm = False
        self._last_rate_decision = clock()
        self.publisher = Publisher(config.published_root, config.publishing.keep_versions)
        self.releases = ReleaseManager(config.publishing, self.publisher)
        self.store = CheckpointStore(config.checkpoints.root, config.checkpoints)
        self.trigger = CheckpointTrigger.from_config(config.checkpoints, clock)
        self.pipeline = self._new_pipeline()
        self.popularity = self.pipeline.joiner.popularity
        self.serving = self._new_serving()
        self.metrics = DaemonMetrics()
        self.timeseries = TimeSeries(config.run_dir)  # the history `streamtrain report` draws
        self.control: ControlServer | None = None
        if not self._restore(resume_from, warm_start):
            self.popularity.sync()  # a fresh joiner state: external statistics enter here, then at checkpoints
        self._sync_serving()

    # ------------------------------------------------------------------ construction
    def _new_trainer(self) -> Trainer:
        cfg = self.config
        return build_trainer(cfg, self.device, redis_cold_tiers(cfg.redis.url, cfg.redis.key_prefix))

    def _new_pipeline(self) -> IngestPipeline:
        ingest = self.config.ingest()
        return build_pipeline(ingest, make_producer(ingest))

    def _new_serving(self) -> ServingPush | None:
        cfg = self.config
        if not (cfg.redis.url and cfg.serving.push):
            return None
        import redis

        client = redis.Redis.from_url(cfg.redis.url, socket_timeout=10.0, socket_connect_timeout=2.0)
        return ServingPush(client, cfg.redis.key_prefix, cfg.serving.keep_versions, cfg.serving.expire_grace_s)

    def _sync_serving(self) -> None:
        """Redis serves what CURRENT names (runtime/serving.py); a failure is counted and retried at the next call."""
        if self.serving is not None:
            self.serving.sync(self.publisher)

    # ------------------------------------------------------------------ state
    def components(self) -> dict[str, Any]:
        return {
            "trainer": self.trainer.state_dict(),
            "pipeline": self.pipeline.state_dict(),
            "buffer": self.buffer.state_dict(),
            "monitors": self.monitors.state_dict(),
            "releases": self.releases.state_dict(),
            "ledger": ledger_state(self._ledger_ids()),
            **({} if self.downsampler is None else {"overload": self.downsampler.state_dict()}),
        }

    def _ledger_ids(self) -> np.ndarray:
        if self.trainer.steps == self._saved_step:
            return self._saved_ledger
        return np.concatenate(self._ledger) if self._ledger else np.zeros(0, np.int64)

    def _restore(self, resume_from: str | None, warm_start: str | None) -> bool:
        """Load the checkpoint to resume from; False when the pipeline starts fresh."""
        if warm_start is not None:
            ckpt = self.store.resolve_warm_start(warm_start)
            self.trainer.load_state_dict(ckpt.components["trainer"], model_only=True)
            log.info("warm start from %s: model and embeddings only, offsets start per config", ckpt.name)
            return False
        try:
            ckpt = self.store.load(resume_from)
        except (CheckpointNotFoundError, NoIntactCheckpointError) as exc:
            if resume_from is not None:
                raise
            log.info("no checkpoint under %s (%s): starting fresh", self.config.checkpoints.root, type(exc).__name__)
            return False
        self._load(ckpt)
        return True

    def _load(self, ckpt: Checkpoint) -> None:
        for skipped in ckpt.skipped:
            log.warning("skipped damaged checkpoint %s: %s", skipped.name, skipped.reason)
        c = ckpt.components
        self.trainer.load_state_dict(c["trainer"])
        self.pipeline.load_state_dict(c["pipeline"])
        self.pipeline.seek(ckpt.offsets)  # the manifest's offsets: the one record of where to continue
        self.buffer.load_state_dict(c["buffer"])
        # The saved rate holds until the next checkpoint, whatever the config says now: a
        # replay from here must drop the rows the original run dropped.
        if "overload" in c:
            if self.downsampler is None:  # mode off now: train the rows it holds, rate 1 from the next checkpoint
                self.downsampler = DownSampler(self.config.trainer.batch_size)
            self.downsampler.load_state_dict(c["overload"])
        elif self.downsampler is not None:
            self.downsampler.set_rate(1.0)  # saved with mode off: nothing down-sampled up to the next checkpoint
        self.monitors.load_state_dict(c["monitors"])
        self.releases.load_state_dict(c["releases"], self.trainer)
        self._saved_ledger, self._saved_step = ledger_ids(c["ledger"]), self.trainer.steps
        self.last_checkpoint = ckpt.name
        self.store.continue_from(ckpt.name)  # the ledger chain goes through what was loaded, not LATEST
        self.monitors.gate.announce()  # a restored FROZEN gate re-fires its alert (not a new transition)
        log.info("resumed from %s: step %d, %d samples trained, offsets %s",
                 ckpt.name, self.trainer.steps, self.trainer.samples, ckpt.offsets)
        self._publish_pending()  # a release decided at this checkpoint's step, if the crash came before it

    def checkpoint(self, reason: str) -> bool:
        """Write a checkpoint now (at a batch boundary). Failures alert and keep training."""
        started = time.monotonic()
        undelivered = self.pipeline.deliver_dlq(10.0)  # DLQ records of checkpointed offsets are delivered first
        if undelivered:
            log.warning("%d DLQ records not yet delivered at checkpoint; they are resent after a crash", undelivered)
        # External statistics enter the joiner only here, so every checkpoint holds what the
        # steps after it will use (consumers/popularity.py: RedisPopularity).
        self.popularity.sync()
        rate_before = self._decide_rate()
        components = self.components()
        try:
            info = self.store.save(self.trainer.steps, components, offsets=self.pipeline.positions(),
                                   watermark=self.pipeline.watermark, config_hash=self.config.config_hash(),
                                   extra_meta={"reason": reason, "samples": self.trainer.samples,
                                               "table_steps": {n: t.table.step for n, t in self.trainer.tables.items()}})
        except CheckpointWriteError as exc:
            self.popularity.discard_sync()  # what it fetched must not be used unrecorded
            if self.downsampler is not None:
                self.downsampler.set_rate(rate_before)  # a rate nowhere recorded must not be used either
            self.checkpoint_failures += 1
            delay = self.trigger.failed()
            log.error("checkpoint failed (%s); training continues, retry in %.0fs", exc, delay,
                      extra={"alert": "checkpoint_write_failed", "errno": exc.errno})
            return False
        self.trigger.saved()
        self._saved_ledger, self._saved_step = ledger_ids(components["ledger"]), self.trainer.steps
        self._ledger.clear()
        self.checkpoints_written += 1
        self.last_checkpoint = info.name
        self._last_checkpoint_wall = time.time()
        self.metrics.checkpoint_duration.observe(time.monotonic() - started)
        for warning in info.warnings:
            log.warning("checkpoint %s: %s", info.name, warning)
        self.pipeline.commit(self.pipeline.positions())  # lag tools only; the checkpoint is the truth
        self._collect_cold_tiers()
        return True

    def _decide_rate(self) -> float:
        """Choose the keep-rate for the steps after the checkpoint being cut (the only moment
        it may change); returns the rate before, for a failed write to restore."""
        if self.downsampler is None:
            return 1.0
        before = self.downsampler.rate
        rate = next_rate(self.config.overload, before, self.backlog)
        self._last_rate_decision = self._clock()
        if rate != before:
            self.downsampler.set_rate(rate)
            log.warning("overload: keep rate of unclicked exposures %.3g -> %.3g (backlog %s)", before, rate,
                        "unmeasured" if self.backlog is None else f"{self.backlog.seconds:.1f}s, "
                        f"{self.backlog.lag_events} events, {'growing' if self.backlog.growing else 'not growing'}")
        return before

    def _rate_change_due(self) -> bool:
        """auto: cut a checkpoint now when the backlog asks for another rate (not more often
        than ``decide_every_s``): the cadence checkpoints alone can be minutes apart."""
        cfg = self.config.overload
        if self.downsampler is None or cfg.mode != "auto" or self._clock() - self._last_rate_decision < cfg.decide_every_s:
            return False
        return next_rate(cfg, self.downsampler.rate, self.backlog) != self.downsampler.rate

    def _measure_backlog(self) -> None:
        """Once per loop turn: the backlog over the last window, and the lag alarm's edges
        (an alert through the log path, like the daemon's other operational alerts)."""
        lag = sum(self.pipeline.lag().values())
        self.backlog = self.backlog_meter.observe(self._clock(), self.pipeline.counters.get("messages", 0), lag)
        if self.backlog is None:
            return
        threshold = self.config.overload.alarm_backlog_s
        if not self.lag_alarm and self.backlog.seconds > threshold:
            self.lag_alarm = True
            log.error("consumer lag alarm: %d events behind, %.0fs at the current speed (> %.0fs); keep rate %.3g",
                      self.backlog.lag_events, self.backlog.seconds, threshold, self._keep_rate(),
                      extra={"alert": "consumer_lag", "lag_events": self.backlog.lag_events,
                             "backlog_s": self.backlog.seconds})
        elif self.lag_alarm and self.backlog.seconds < threshold / 2:
            self.lag_alarm = False
            log.warning("consumer lag alarm cleared: %d events behind, %.0fs", self.backlog.lag_events,
                        self.backlog.seconds, extra={"alert": "consumer_lag_cleared"})

    def _keep_rate(self) -> float:
        return 1.0 if self.downsampler is None else self.downsampler.rate

    def _collect_cold_tiers(self) -> None:
        """Let each cold tier drop the row versions no retained checkpoint can read back:
        those older than what a restore from the oldest retained checkpoint needs (its
        table step, recorded in every manifest)."""
        tiers = {n: t.table.cold_tier for n, t in self.trainer.tables.items() if t.table.cold_tier is not None}
        if not tiers:
            return
        manifests = [status.manifest for status in self.store.list_checkpoints()]
        if not manifests or any(m is None or "table_steps" not in m.extra for m in manifests):
            log.warning("a retained checkpoint has no readable table steps: cold-tier versions are kept for now")
            return
        for name, tier in tiers.items():
            tier.retain_from(min(int(m.extra["table_steps"][name]) for m in manifests))  # type: ignore[union-attr]

    def _publish_pending(self) -> None:
        """Publish the release decided at the last checkpoint's step, naming that checkpoint."""
        if self.releases.pending is None:
            return
        meta = {"monitors": self.monitors.status(), "config_hash": self.config.config_hash()}
        self.releases.publish_pending(self.trainer, self.last_checkpoint, meta)
        self._sync_serving()

    # ------------------------------------------------------------------ control (thread-safe)
    def request(self, command: str, reason: str) -> dict[str, Any]:
        """Called from the control endpoint's threads; applied by the loop between steps."""
        if not self._accepting:
            raise ShuttingDown(f"the daemon is shutting down: {command} was not applied")
        future: Future[dict[str, Any]] = Future()
        self._commands.put((command, reason, future))
        return future.result(timeout=30)

    def _apply_commands(self) -> None:
        while True:
            try:
                command, reason, future = self._commands.get_nowait()
            except queue.Empty:
                return
            gate = self.monitors.gate
            transition = gate.freeze(reason) if command == "freeze" else gate.unfreeze(reason)
            future.set_result({"gate": gate.state.value, "changed": transition is not None})

    def _refuse_commands(self) -> None:
        """After the loop: commands that arrived too late are answered, not left to time out."""
        self._accepting = False
        while True:
            try:
                command, _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            future.set_exception(ShuttingDown(f"the daemon is shutting down: {command} was not applied"))

    def status(self) -> DaemonStatus:
        """The snapshot of the last loop turn (thread-safe)."""
        with self._status_lock:
            return self._status

    def _update_status(self, state: str = "running") -> None:
        current = self.publisher.current()
        last = self.monitors.gate.last_transition
        tables = {name: TableStatus(rows=t.table.size, load_factor=t.table.load_factor,
                                    counters=dict(vars(t.table.counters)))
                  for name, t in self.trainer.tables.items()}
        status = DaemonStatus(
            state=state,
            topic=self.config.kafka.topic,
            steps=self.trainer.steps,
            samples_trained=self.trainer.samples,
            samples_per_s=self.trainer.samples / max(1e-9, self._clock() - self._started),
            losses=dict(self._losses),
            gate=self.monitors.gate.status(),
            gate_transitions=last.seq if last is not None else 0,
            monitors=self.monitors.status(),
            offsets=self.pipeline.positions(),
            lag=self.pipeline.lag(),
            watermark=None if self.pipeline.watermark == NO_WATERMARK else self.pipeline.watermark,
            counters=self.pipeline.counters,
            held=self.pipeline.held,
            tables=tables,
            last_checkpoint=self.last_checkpoint,
            last_checkpoint_wall=self._last_checkpoint_wall,
            checkpoints_written=self.checkpoints_written,
            checkpoint_failures=self.checkpoint_failures,
            dead_polls=self.dead_polls,
            current_version=None if current is None else VersionStatus(
                current.name, current.number, float(current.manifest.get("created", 0.0))),
            overload={"keep_rate": self._keep_rate(), "lag_alarm": int(self.lag_alarm),
                      "backlog_s": -1.0 if self.backlog is None else min(self.backlog.seconds, 1e9),
                      **({} if self.downsampler is None else {
                          k: v for k, v in self.downsampler.status().items() if k != "keep_rate"})},
            releases={"released": self.releases.released, "held": self.releases.held,
                      "rollbacks": self.releases.rollbacks, "failures": self.releases.failures,
                      **({} if self.serving is None else {
                          "serving_pushes": self.serving.counters.pushes,
                          "serving_full_pushes": self.serving.counters.full_pushes,
                          "serving_failures": self.serving.counters.failures})},
        )
        with self._status_lock:
            self._status = status
        self.metrics.update_snapshot(metric_points(status))
        self.timeseries.turn(status, {"freshness": self.metrics.freshness, "join_latency": self.metrics.join_latency})

    # ------------------------------------------------------------------ the loop
    def _observe(self, batch: SampleBatch, result: StepResult, watched: np.ndarray | None) -> None:
        """Hand a step's prequential scores to the monitors and the shadow check. Correction
        rows (``emit_then_correct``) re-emit an exposure already scored: they are not new
        rows, so monitors and the shadow window see exposures only. Under down-sampling
        they see the ``watched`` rows only: a uniform share of the exposures, positives
        included (runtime/overload.py), so their rates and calibration stay unbiased."""
        self.hooks.on_trained(batch, result)
        fresh = ~batch["is_correction"] if watched is None else ~batch["is_correction"] & watched
        rows = batch if fresh.all() else {k: v[fresh] for k, v in batch.items()}
        if not len(rows["sample_id"]):
            return
        predictions = result.predictions
        p_ctr, p_ctcvr = (predictions.p_ctr, predictions.p_ctcvr) if fresh.all() else (
            predictions.p_ctr[fresh], predictions.p_ctcvr[fresh])
        verdicts = self.monitors.update(p_ctr, p_ctcvr, rows["click"], rows["convert"], rows["sparse"], rows["dense"])
        for verdict in verdicts:
            _log_window(verdict)
            self.timeseries.window(verdict, samples=self.trainer.samples, ts_ms=int(rows["ts"].max()))
        self.releases.observe(rows, Predictions(p_ctr, p_ctcvr))

    def _train_one(self, kept: KeptBatch) -> None:
        batch = kept.batch
        result = self.trainer.step(batch)
        self._losses = result.losses
        self.metrics.step_duration.observe(result.seconds)
        self._observe(batch, result, kept.watched)
        self._observe_latencies(batch)
        size = len(batch["sample_id"])
        self._ledger.append(batch["sample_id"].copy())
        rollbacks = self.releases.rollbacks
        self.releases.account(size, self.monitors.gate, self.trainer.samples)
        if self.releases.rollbacks != rollbacks:
            self._sync_serving()  # CURRENT moved back: serving follows
        self.trigger.record(size)
        release = self.releases.decide(self.monitors.gate)
        due = self.trigger.due()
        overload = self._rate_change_due()
        if release or due or overload or self.popularity.sync_due():  # popularity: a fresh stats snapshot every refresh_s
            self.checkpoint("release" if release else "cadence" if due else "overload" if overload else "popularity")
        if release:
            # The version names the checkpoint of this very step; when that write failed
            # there is none, and the release is dropped rather than published unnamed.
            written = self.last_checkpoint if self._saved_step == self.trainer.steps else None
            if written is None:
                self.releases.drop_pending("the checkpoint of its step could not be written")
            else:
                self._publish_pending()

    def _warn_if_mostly_dead(self) -> None:
        """Most of a poll dead-lettered is almost never bad luck: a producer or a setting is
        wrong (e.g. a replay's old timestamps below decoder.min_ts_ms), and the daemon would
        sit at zero samples. Say so loudly, with the top reason (rate-limited), and count it."""
        report = self.pipeline.last_poll
        if not report.mostly_dead():
            return
        self.dead_polls += 1
        reason, count = report.dead_lettered.most_common(1)[0]
        self._dead_poll_log.warning(
            "%d of the last %d messages went to the DLQ, most as %r: check the producers against docs/events.md "
            "and the decoder settings (streamtrain_dlq_events_total{reason=%r})", sum(report.dead_lettered.values()),
            report.messages, reason, reason, extra={"alert": "dlq_majority", "reason": reason, "count": count})

    def _observe_latencies(self, batch: SampleBatch) -> None:
        """Freshness: wall now - exposure event time (meaningful where event time is wall
        time, as in production; it includes the label-window wait by design). Join latency:
        event time from the exposure to the watermark that released its sample."""
        ts_s = batch["ts"].astype(np.float64) / 1000.0
        now = time.time()
        watermark_s = self.pipeline.watermark / 1000.0
        for exposure_s in ts_s:
            self.metrics.freshness.observe(max(0.0, now - exposure_s))
            self.metrics.join_latency.observe(max(0.0, watermark_s - exposure_s))

    def _pop_batch(self) -> KeptBatch | None:
        if self.downsampler is None:
            batch = self.buffer.pop_batch()
            return None if batch is None else KeptBatch(batch, None)
        return self.downsampler.pop_batch(self.buffer)

    def _drain(self) -> KeptBatch | None:
        if self.downsampler is None:
            rest = self.buffer.drain()
            return None if rest is None else KeptBatch(rest, None)
        return self.downsampler.drain(self.buffer)

    def _done(self) -> bool:
        return self.stop_after_samples is not None and self.trainer.samples >= self.stop_after_samples

    def run(self) -> RunSummary:
        cfg = self.config
        servers = self._start_servers()
        paused = False
        stopped_by = "signal"
        try:
            self._update_status("starting")  # the restored state, before the first poll
            while not self.stop.is_set():
                self._apply_commands()
                gate_lets_consume = self.monitors.gate.should_consume()
                if gate_lets_consume == paused:  # edge: pause on freeze(action=pause), resume after
                    (self.pipeline.resume if paused else self.pipeline.pause)()
                    paused = not gate_lets_consume
                if not paused:
                    started = time.perf_counter()
                    batches = self.pipeline.poll(cfg.trainer.poll_max_messages, cfg.trainer.poll_timeout_s)
                    self.hooks.on_polled(batches, time.perf_counter() - started)
                    self._warn_if_mostly_dead()
                    for batch in batches:
                        self.buffer.extend(batch)
                else:
                    time.sleep(cfg.trainer.poll_timeout_s)
                # Check the stop point *before* popping: a popped batch must be trained.
                while not self._done() and (batch := self._pop_batch()) is not None:
                    self._train_one(batch)
                if self.pipeline.end_of_input and not self._done():
                    # A finite log ended (consumers/markers.py): its last samples end in a shorter batch.
                    while not self._done() and (rest := self._drain()) is not None:
                        self._train_one(rest)
                    stopped_by = "end_of_input"
                    log.info("end of input on every partition: %d samples trained", self.trainer.samples)
                self._measure_backlog()
                self._update_status()
                if self._done():
                    stopped_by = "stop_after_samples"
                if stopped_by != "signal":
                    break
            self.checkpoint("shutdown")
            self._update_status("stopped")
            return self.summary(stopped_by)
        finally:
            self._refuse_commands()
            for server in servers:
                server.stop()
            self.close()

    def close(self) -> None:
        """Release Kafka clients, alert sinks and the checkpoint lock (before services stop)."""
        undelivered = self.pipeline.close(5.0)
        if undelivered:
            log.warning("%d DLQ records could not be delivered at exit (broker unreachable?)", undelivered)
        self.monitors.close()
        self.store.close()
        self.config.endpoints_path.unlink(missing_ok=True)

    def _start_servers(self) -> list[Any]:
        cfg = self.config
        servers: list[Any] = []
        endpoints: dict[str, Any] = {"pid": os.getpid()}
        if cfg.metrics.enabled:
            port = self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
            endpoints["metrics"] = f"http://{cfg.metrics.host}:{port}/metrics"
            log.info("metrics on %s", endpoints["metrics"])
            servers.append(self.metrics)
        if cfg.control.enabled:
            token = ensure_token(cfg.control.token, cfg.run_dir / "control.token")
            self.control = ControlServer(cfg.control.host, cfg.control.port, token, unavailable=(ShuttingDown,),
                                         status=lambda: self.status().to_json(),
                                         freeze=lambda r: self.request("freeze", r),
                                         unfreeze=lambda r: self.request("unfreeze", r))
            servers.append(self.control.start())
            endpoints["control"] = self.control.url
        _write_endpoints(cfg.endpoints_path, endpoints)
        return servers

    def summary(self, stopped_by: str) -> RunSummary:
        verdict = self.monitors.status()["monitors"].get("auc", {}).get("last_verdict") or {}
        auc = verdict.get("metrics", {}).get("auc/ctr")
        return RunSummary(samples_trained=self.trainer.samples, steps=self.trainer.steps,
                          checkpoints=self.checkpoints_written, checkpoint_failures=self.checkpoint_failures,
                          published_versions=self.releases.released, gate=self.monitors.gate.state.value,
                          auc=auc, stopped_by=stopped_by)


def _log_window(verdict: Verdict) -> None:
    """Every closed AUC window is a point of the learning curve: log it (INFO); other
    windows at DEBUG (bad ones are logged as warnings by the monitors' LogSink)."""
    level = logging.INFO if verdict.monitor == "auc" else logging.DEBUG
    if log.isEnabledFor(level):
        metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(verdict.metrics.items()) if isinstance(v, float))
        log.log(level, "%s window %d (%d samples): %s", verdict.monitor, verdict.window, verdict.sample_count, metrics,
                extra={"window": verdict.to_dict()})


def _write_endpoints(path: Path, endpoints: dict[str, Any]) -> None:
    """Where this process listens (ports may be picked at start), for `streamtrain gate`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(orjson.dumps(endpoints))
    tmp.replace(path)
