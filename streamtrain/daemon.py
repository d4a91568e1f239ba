"""The training daemon: the one place that wires consumers, trainer, monitors, checkpoints,
publisher, metrics and the control endpoint together.

Loop, one turn per poll::

    poll Kafka -> decode/join -> samples  ->  SampleBuffer (fixed-size batches)
    for each full batch:  forward (prequential scores) -> monitors + shadow -> backward/update
                          -> ledger -> release (if due, gate OPEN, shadow ok) -> checkpoint (if due)

Exactly-once (DESIGN §6.1). A checkpoint is cut between two training steps and holds,
together: the trainer (dense weights, Adam, tables, RNG), the pipeline (joiner state and
the Kafka positions of everything it consumed), the samples emitted but not yet trained
(the buffer), the monitors and gate, and the ledger of sample ids trained since the
previous checkpoint. Restarting seeks every partition to the saved positions: every
message is either reflected in the saved state or re-read, never both. Batch boundaries
depend only on the sample sequence, which the joiner makes independent of arrival timing,
so a replay reproduces the uninterrupted run bit for bit on CPU.

Shutdown (SIGTERM / Ctrl-C): stop polling, finish the current step, write a final
checkpoint, commit offsets to Kafka (for lag tools only), close. A second signal exits
at once (``stop_event_on_signals``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
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
from consumers.pipeline import IngestPipeline
from consumers.runtime import build_pipeline, make_producer
from consumers.source import KafkaSource
from monitors.alerts import build_sinks
from monitors.suite import MonitorSuite
from streamtrain.batching import SampleBuffer
from streamtrain.config import StreamtrainConfig
from streamtrain.control import ControlServer, ensure_token
from streamtrain.daemon_metrics import metric_points
from streamtrain.embedding.redis_tier import RedisColdTier
from streamtrain.metrics import DaemonMetrics
from streamtrain.publisher import Publisher
from streamtrain.releases import ReleaseManager
from streamtrain.trainer import Predictions, Trainer, pick_device

log = logging.getLogger("streamtrain.daemon")


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
        observers: tuple[Callable[[dict[str, np.ndarray], Predictions], None], ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stop = stop
        self.stop_after_samples = stop_after_samples
        self._observers = observers  # extra prequential hooks (the demo's AUC tracker)
        self._clock = clock
        self._commands: queue.Queue[tuple[str, str, Future[dict[str, Any]]]] = queue.Queue()
        self._status_lock = threading.Lock()
        self._status: dict[str, Any] = {"state": "starting"}
        self.checkpoints_written = 0
        self.checkpoint_failures = 0
        self.last_checkpoint: str | None = None
        self._last_checkpoint_wall: float | None = None
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
        self.publisher = Publisher(config.published_root, config.publishing.keep_versions)
        self.releases = ReleaseManager(config.publishing, self.publisher, self._shadow_of)
        self.store = CheckpointStore(config.checkpoints.root, config.checkpoints)
        self.trigger = CheckpointTrigger.from_config(config.checkpoints, clock)
        self.pipeline = self._new_pipeline()
        self.metrics = DaemonMetrics()
        self.control: ControlServer | None = None
        self._restore(resume_from, warm_start)

    # ------------------------------------------------------------------ construction
    def _new_trainer(self) -> Trainer:
        cfg = self.config
        cold_tier: Callable[[str], RedisColdTier | None] = lambda name: None  # noqa: E731
        if cfg.redis.url:
            import redis

            client = redis.Redis.from_url(cfg.redis.url)
            cold_tier = lambda name: RedisColdTier(client, f"{cfg.redis.key_prefix}emb:{name}:")  # noqa: E731
        tables = {name: getattr(cfg.embeddings, name) for name in ("item", "user", "sparse")}
        return Trainer(cfg.model, tables, learning_rate=cfg.trainer.learning_rate, seed=cfg.trainer.seed,
                       device=self.device, cold_tier=cold_tier)

    def _shadow_of(self, trainer: Trainer) -> Trainer:
        shadow = self._new_trainer()
        shadow.load_state_dict(trainer.state_dict(), model_only=True)
        return shadow

    def _new_pipeline(self) -> IngestPipeline:
        ingest = self.config.ingest()
        # batch_size=None: the daemon's SampleBuffer cuts the training batches, so the
        # stop point and the checkpointed remainder live in one place.
        return build_pipeline(ingest, make_producer(ingest))

    # ------------------------------------------------------------------ state
    def components(self) -> dict[str, Any]:
        return {
            "trainer": self.trainer.state_dict(),
            "pipeline": self.pipeline.state_dict(),
            "buffer": self.buffer.state_dict(),
            "monitors": self.monitors.state_dict(),
            "releases": self.releases.state_dict(),
            "ledger": ledger_state(self._ledger_ids()),
        }

    def _ledger_ids(self) -> np.ndarray:
        if self.trainer.steps == self._saved_step:
            return self._saved_ledger
        return np.concatenate(self._ledger) if self._ledger else np.zeros(0, np.int64)

    def _restore(self, resume_from: str | None, warm_start: str | None) -> None:
        if warm_start is not None:
            ckpt = self.store.resolve_warm_start(warm_start)
            self.trainer.load_state_dict(ckpt.components["trainer"], model_only=True)
            log.info("warm start from %s: model and embeddings only, offsets start per config", ckpt.name)
            return
        try:
            ckpt = self.store.load(resume_from)
        except (CheckpointNotFoundError, NoIntactCheckpointError) as exc:
            if resume_from is not None:
                raise
            log.info("no checkpoint under %s (%s): starting fresh", self.config.checkpoints.root, type(exc).__name__)
            return
        self._load(ckpt)

    def _load(self, ckpt: Checkpoint) -> None:
        for skipped in ckpt.skipped:
            log.warning("skipped damaged checkpoint %s: %s", skipped.name, skipped.reason)
        c = ckpt.components
        self.trainer.load_state_dict(c["trainer"])
        self.pipeline.load_state_dict(c["pipeline"])  # also seeks every partition to the saved offsets
        self.buffer.load_state_dict(c["buffer"])
        self.monitors.load_state_dict(c["monitors"])
        self.releases.load_state_dict(c["releases"])
        self._saved_ledger, self._saved_step = ledger_ids(c["ledger"]), self.trainer.steps
        self.last_checkpoint = ckpt.name
        self.monitors.gate.announce()  # a restored FROZEN gate re-fires its alert (Alertmanager forgets)
        log.info("resumed from %s: step %d, %d samples trained, offsets %s",
                 ckpt.name, self.trainer.steps, self.trainer.samples, ckpt.offsets)

    def checkpoint(self, reason: str) -> bool:
        """Write a checkpoint now (at a batch boundary). Failures alert and keep training."""
        started = time.monotonic()
        undelivered = self.pipeline.dlq.flush(10.0)  # DLQ records of checkpointed offsets are delivered first
        if undelivered:
            log.warning("%d DLQ records not yet delivered at checkpoint; they are resent after a crash", undelivered)
        components = self.components()
        try:
            info = self.store.save(self.trainer.steps, components, offsets=self.pipeline.positions(),
                                   watermark=int(self.pipeline.joiner.watermark), config_hash=self.config.config_hash(),
                                   extra_meta={"reason": reason, "samples": self.trainer.samples})
        except CheckpointWriteError as exc:
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
        self._commit_offsets()
        return True

    def _commit_offsets(self) -> None:
        source = self.pipeline.source
        if isinstance(source, KafkaSource):
            source.commit(self.pipeline.positions())  # lag tools only; the checkpoint is the truth

    # ------------------------------------------------------------------ control (thread-safe)
    def request(self, command: str, reason: str) -> dict[str, Any]:
        """Called from the control endpoint's threads; applied by the loop between steps."""
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

    def status(self) -> dict[str, Any]:
        with self._status_lock:
            return dict(self._status)

    def _update_status(self, losses: dict[str, float]) -> None:
        current = self.publisher.current()
        source = self.pipeline.source
        lag = source.lag() if isinstance(source, KafkaSource) else {}
        status = {
            "state": "running",
            "gate": self.monitors.gate.status(),
            "monitors": self.monitors.status(),
            "offsets": self.pipeline.positions(),
            "lag": lag,
            "watermark": int(self.pipeline.joiner.watermark),
            "steps": self.trainer.steps,
            "samples_trained": self.trainer.samples,
            "samples_per_s": self.trainer.samples / max(1e-9, self._clock() - self._started),
            "losses": losses,
            "last_checkpoint": self.last_checkpoint,
            "checkpoint_failures": self.checkpoint_failures,
            "current_version": current.name if current else None,
            "counters": self.pipeline.counters,
        }
        with self._status_lock:
            self._status = status
        self.metrics.publish(metric_points(self, status, current))

    # ------------------------------------------------------------------ the loop
    def _observe(self, batch: dict[str, np.ndarray], predictions: Predictions) -> None:
        self.monitors.update(predictions.p_ctr, predictions.p_ctcvr, batch["click"], batch["convert"],
                             batch["sparse"], batch["dense"])
        self.releases.observe(batch, predictions)
        for observer in self._observers:
            observer(batch, predictions)

    def _train_one(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        losses = self.trainer.step(batch, self._observe)
        self._observe_latencies(batch)
        self._ledger.append(batch["sample_id"].copy())
        self.releases.after_step(self.trainer, self.monitors.gate, len(batch["sample_id"]), self._release_meta)
        self.trigger.record(len(batch["sample_id"]))
        return losses

    def _observe_latencies(self, batch: dict[str, np.ndarray]) -> None:
        """Freshness: wall now - exposure event time (meaningful where event time is wall
        time, as in production; it includes the label-window wait by design). Join latency:
        event time from the exposure to the watermark that released its sample."""
        ts_s = batch["ts"].astype(np.float64) / 1000.0
        now = time.time()
        watermark_s = int(self.pipeline.joiner.watermark) / 1000.0
        for exposure_s in ts_s:
            self.metrics.freshness.observe(max(0.0, now - exposure_s))
            self.metrics.join_latency.observe(max(0.0, watermark_s - exposure_s))

    def _release_meta(self) -> dict[str, Any]:
        return {"checkpoint": self.last_checkpoint, "monitors": self.monitors.status(),
                "config_hash": self.config.config_hash()}

    def _done(self) -> bool:
        return self.stop_after_samples is not None and self.trainer.samples >= self.stop_after_samples

    def run(self, on_step: Callable[[Daemon], None] | None = None) -> RunSummary:
        cfg = self.config
        servers = self._start_servers()
        losses: dict[str, float] = {}
        paused = False
        stopped_by = "signal"
        try:
            while not self.stop.is_set():
                self._apply_commands()
                gate_lets_consume = self.monitors.gate.should_consume()
                if gate_lets_consume == paused:  # edge: pause on freeze(action=pause), resume after
                    (self.pipeline.resume if paused else self.pipeline.pause)()
                    paused = not gate_lets_consume
                if not paused:
                    for batch in self.pipeline.poll(cfg.trainer.poll_max_messages, cfg.trainer.poll_timeout_s):
                        self.buffer.extend(batch)
                else:
                    time.sleep(cfg.trainer.poll_timeout_s)
                # Check the stop point *before* popping: a popped batch must be trained.
                while not self._done() and (batch := self.buffer.pop_batch()) is not None:
                    losses = self._train_one(batch)
                    if self.trigger.due():
                        self.checkpoint("cadence")
                    if on_step is not None:
                        on_step(self)
                self._update_status(losses)
                if self._done():
                    stopped_by = "stop_after_samples"
                    break
            self.checkpoint("shutdown")
            self._update_status(losses)
            return self.summary(stopped_by)
        finally:
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

    def _start_servers(self) -> list[Any]:
        cfg = self.config
        servers: list[Any] = []
        if cfg.metrics.enabled:
            port = self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
            log.info("metrics on http://%s:%d/metrics", cfg.metrics.host, port)
            servers.append(self.metrics)
        if cfg.control.enabled:
            token = ensure_token(cfg.control.token, cfg.run_dir / "control.token")
            self.control = ControlServer(cfg.control.host, cfg.control.port, token, status=self.status,
                                         freeze=lambda r: self.request("freeze", r),
                                         unfreeze=lambda r: self.request("unfreeze", r))
            servers.append(self.control.start())
        return servers

    def summary(self, stopped_by: str) -> RunSummary:
        verdict = self.monitors.status()["monitors"].get("auc", {}).get("last_verdict") or {}
        auc = verdict.get("metrics", {}).get("auc/ctr")
        return RunSummary(samples_trained=self.trainer.samples, steps=self.trainer.steps,
                          checkpoints=self.checkpoints_written, checkpoint_failures=self.checkpoint_failures,
                          published_versions=self.releases.released, gate=self.monitors.gate.state.value,
                          auc=auc, stopped_by=stopped_by)
