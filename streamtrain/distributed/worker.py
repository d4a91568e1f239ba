"""One rank of a scale-out run: its partitions' joiner, its rows of every global batch,
its shard of every table; the rest replicated. The loop, every rank in lock-step::

    ingest its partitions (no emission yet)
    agree: watermark = min over ranks of what their partitions allow (all_reduce), end of
           input = every rank's partitions ended, stop = any rank was asked to stop
    advance every joiner to that watermark together (they share popularity and item pool
           bucket by bucket, consumers/topic.py) -> each emits its partitions' samples
    gather every rank's samples, merged in the emission order -> the replicated buffer
    for each full batch: trainer.step (rows split over ranks, tables sharded)
                         -> monitors (replicated) -> ledger -> checkpoint if due (collective)

Because a joiner's output does not depend on timing and every joiner advances to the
same watermark, the merged sample sequence is the one a single joiner emits, and the
buffer cuts it into the same batches as the single-process daemon (docs/architecture.md,
"Scale-out"). Nothing here depends on which rank owns which partition.

Not here (single-process daemon only): model publishing, the metrics and control
endpoints, warm starts. A rank whose peer dies fails in its next collective; the
launcher restarts the whole group from the last checkpoint.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import orjson
import torch
from confluent_kafka import Consumer, KafkaException

from checkpoints import (
    CheckpointNotFoundError,
    CheckpointStore,
    CheckpointTrigger,
    CheckpointWriteError,
    NoIntactCheckpointError,
    ledger_ids,
    ledger_state,
)
from consumers.batching import SampleBuffer
from consumers.config import KafkaSourceConfig
from consumers.pipeline import IngestPipeline
from consumers.ratelimit import RateLimitedLog
from consumers.runtime import build_pipeline, make_producer
from consumers.schema import SampleBatch
from monitors.alerts import build_sinks
from monitors.suite import MonitorSuite
from streamtrain.config import StreamtrainConfig
from streamtrain.distributed.comm import Comm
from streamtrain.distributed.layout import RankShare, RunState, compose, decompose, placement, split
from streamtrain.distributed.replicas import RowReplicas
from streamtrain.distributed.samples import SampleExchange
from streamtrain.distributed.sharded_embedding import ShardedDynamicEmbedding
from streamtrain.distributed.state import pack_state, unpack_state
from streamtrain.distributed.topic import TorchTopicExchange
from streamtrain.embedding.redis_tier import redis_cold_tiers
from streamtrain.trainer import Trainer, build_trainer

log = logging.getLogger("streamtrain.distributed")

_NO_FLOOR = 2**63 - 1  # a rank without partitions does not hold the watermark back
_NO_FORCE = -(2**63)


@dataclass
class WorkerSummary:
    samples_trained: int
    steps: int
    checkpoints: int
    workers: int
    stopped_by: str


def partition_count(config: KafkaSourceConfig, stop: threading.Event) -> int:
    """How many partitions the topic has, once its metadata is there (like the
    single-process daemon, a worker waits for the topic, logging now and then)."""
    consumer = Consumer({"bootstrap.servers": config.bootstrap_servers, "group.id": config.group_id,
                         "logger": log, **config.client_overrides})
    waiting = RateLimitedLog(config.stall_log_interval_s, time.monotonic, log)
    try:
        while not stop.is_set():
            try:
                topic = consumer.list_topics(config.topic, timeout=5).topics.get(config.topic)
            except KafkaException as exc:
                topic = None
                waiting.warning("no metadata for topic %s yet: %s", config.topic, exc)
            if topic is not None and topic.error is None and topic.partitions:
                return len(topic.partitions)
            waiting.warning("topic %s not available yet", config.topic)
            time.sleep(config.error_backoff_s or 0.5)
        raise RuntimeError("stopped while waiting for the topic")
    finally:
        consumer.close()


class Worker:
    def __init__(self, config: StreamtrainConfig, comm: Comm, device: torch.device, *, stop: threading.Event,
                 resume_from: str | None = None, stop_after_samples: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if config.kafka.mode != "assign":
            raise ValueError("a scale-out run places partitions itself: set kafka.mode=assign")
        self.config = config
        self.comm = comm
        self.stop = stop
        self.stop_after_samples = stop_after_samples
        self.leader = comm.rank == 0
        self.checkpoints_written = 0
        self.last_checkpoint: str | None = None
        self._ledger: list[np.ndarray] = []
        self._saved_ledger = np.zeros(0, np.int64)
        self._saved_step: int | None = None

        torch.set_num_threads(config.trainer.threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        self.device = device
        all_partitions = self._agree_on_partitions()
        self.plan = placement(all_partitions, comm.world)
        self.partitions = self.plan[comm.rank]
        self.trainer = self._new_trainer()
        self.pipeline = self._new_pipeline()
        self.samples = SampleExchange(comm, config.joiner.history_len, config.joiner.num_random_negatives,
                                      len(config.features.sparse), len(config.features.dense))
        # Monitors are replicated (every rank sees every global batch); one rank alerts.
        self.monitors = MonitorSuite(config.monitors, config.features.sparse, config.features.dense,
                                     sinks=build_sinks(config.monitors.alerts) if self.leader else ())
        self.buffer = SampleBuffer(config.trainer.batch_size)
        self.trigger = CheckpointTrigger.from_config(config.checkpoints, clock)
        self.store = CheckpointStore(config.checkpoints.root, config.checkpoints) if self.leader else None
        log.info("rank %d of %d: partitions %s", comm.rank, comm.world, self.partitions)
        self._restore(resume_from)

    # ------------------------------------------------------------------ construction
    def _agree_on_partitions(self) -> list[int]:
        """Every rank reads the topic's partition count (waiting outside any collective,
        which would time out); they must agree, then each places them the same way."""
        count = partition_count(self.config.kafka, self.stop)
        low, high = self.comm.all_min([count])[0], self.comm.all_max([count])[0]
        if low != high:
            raise RuntimeError(f"ranks see {low} and {high} partitions of {self.config.kafka.topic}: is it being resized?")
        return list(range(count))

    def _new_trainer(self) -> Trainer:
        cfg = self.config
        return build_trainer(cfg, self.device, redis_cold_tiers(cfg.redis.url, cfg.redis.key_prefix),
                             embedding=partial(ShardedDynamicEmbedding, comm=self.comm), replicas=RowReplicas(self.comm))

    def _new_pipeline(self) -> IngestPipeline:
        ingest = self.config.ingest()
        source = ingest.source.model_copy(update={"only_partitions": tuple(self.partitions)})
        ingest = ingest.model_copy(update={"source": source})
        pipeline = build_pipeline(ingest, make_producer(ingest), exchange=TorchTopicExchange(self.comm))
        # Hold the watermark from the start: until the source has assigned them (it may not
        # see the topic at once), unassigned partitions would let the other ranks advance
        # past events this rank has not read yet.
        pipeline.joiner.assign(self.partitions)
        return pipeline

    # ------------------------------------------------------------------ state
    def _share(self) -> RankShare:
        trainer = self.trainer.state_dict()
        return RankShare(trainer["tables"], self.pipeline.state_dict(), trainer["rng"])

    def _shared(self) -> dict[str, dict[str, Any]]:
        trainer = self.trainer.state_dict()
        del trainer["tables"], trainer["rng"]
        return {"trainer": trainer, "buffer": self.buffer.state_dict(), "monitors": self.monitors.state_dict()}

    def _restore(self, resume_from: str | None) -> None:
        """Rank 0 loads the checkpoint and splits it for this run's ranks; every rank loads
        its share. Fresh start when there is none (and none was named)."""
        header: bytes | None = None
        shares: list[bytes] | None = None
        if self.leader:
            assert self.store is not None
            try:
                ckpt = self.store.load(resume_from)
            except (CheckpointNotFoundError, NoIntactCheckpointError) as exc:
                if resume_from is not None:
                    raise
                log.info("no checkpoint under %s (%s): starting fresh", self.config.checkpoints.root, type(exc).__name__)
                ckpt = None
            if ckpt is None:
                header = pack_state({"format_version": 1, "fresh": True})
            else:
                for skipped in ckpt.skipped:
                    log.warning("skipped damaged checkpoint %s: %s", skipped.name, skipped.reason)
                if "releases" in ckpt.components:
                    log.warning("%s holds a release schedule: a scale-out run does not publish, it is not restored",
                                ckpt.name)
                run = split(decompose(ckpt.components), self.plan, num_sparse=len(self.config.features.sparse),
                            num_dense=len(self.config.features.dense),
                            table_min_rows={n: t.table.config.initial_rows for n, t in self.trainer.tables.items()})
                offsets = {t: {str(p): o for p, o in parts.items()} for t, parts in ckpt.offsets.items()}
                header = pack_state({"format_version": 1, "fresh": False, "name": ckpt.name, "offsets": offsets,
                                     **run.shared})
                shares = [pack_state({"format_version": 1, "tables": s.tables, "pipeline": s.pipeline, "rng": s.rng})
                          for s in run.ranks]
                self._saved_ledger = ledger_ids(ckpt.components["ledger"])
                self.last_checkpoint = ckpt.name
                self.store.continue_from(ckpt.name)  # the ledger chain goes through what was loaded
        shared = unpack_state(self.comm.broadcast_bytes(header))
        if shared["fresh"]:
            return
        mine = unpack_state(self.comm.scatter_bytes(shares))
        self.trainer.load_state_dict({**shared["trainer"], "tables": mine["tables"], "rng": mine["rng"]})
        self.pipeline.load_state_dict(mine["pipeline"])
        topic = self.config.kafka.topic
        own = {int(p): int(o) for p, o in shared["offsets"].get(topic, {}).items() if int(p) in self.partitions}
        self.pipeline.seek({topic: own})  # the manifest's offsets of this rank's partitions
        self.buffer.load_state_dict(shared["buffer"])
        self.monitors.load_state_dict(shared["monitors"])
        self._saved_step = self.trainer.steps
        self.monitors.gate.announce()
        if self.leader:
            log.info("resumed from %s on %d workers: step %d, %d samples trained", shared["name"], self.comm.world,
                     self.trainer.steps, self.trainer.samples)

    def checkpoint(self, reason: str) -> bool:
        """Every rank together: cut here, gather every share on rank 0, write one checkpoint."""
        undelivered = self.pipeline.deliver_dlq(10.0)
        if undelivered:
            log.warning("%d DLQ records not yet delivered at checkpoint; they are resent after a crash", undelivered)
        share = self._share()
        positions = self.pipeline.positions()
        parts = self.comm.gather_bytes(pack_state({"format_version": 1, "tables": share.tables, "pipeline": share.pipeline,
                                                   "rng": share.rng, "positions": _str_keys(positions)}))
        saved = b"0"
        if parts is not None:
            saved = self._write(reason, [unpack_state(p) for p in parts])
        ok = self.comm.broadcast_bytes(saved if self.leader else None) == b"1"
        if ok:
            self.pipeline.commit(positions)  # lag tools only; the checkpoint is the truth
            self._collect_cold_tiers()
        return ok

    def _write(self, reason: str, shares: list[dict[str, Any]]) -> bytes:
        """Rank 0: one checkpoint of every rank's share; b"1" when it was written."""
        assert self.store is not None
        run = RunState(self._shared(), [RankShare(s["tables"], s["pipeline"], s["rng"]) for s in shares], self.plan)
        ledger = self._saved_ledger if self.trainer.steps == self._saved_step else (
            np.concatenate(self._ledger) if self._ledger else np.zeros(0, np.int64))
        components = {**compose(run), "ledger": ledger_state(ledger)}
        offsets: dict[str, dict[int, int]] = {}
        for s in shares:
            for topic, parts in s["positions"].items():
                offsets.setdefault(topic, {}).update({int(p): int(o) for p, o in parts.items()})
        try:
            info = self.store.save(self.trainer.steps, components, offsets=offsets, watermark=self.pipeline.watermark,
                                   config_hash=self.config.config_hash(),
                                   extra_meta={"reason": reason, "samples": self.trainer.samples, "workers": self.comm.world,
                                               "table_steps": {n: t.table.step for n, t in self.trainer.tables.items()}})
        except CheckpointWriteError as exc:
            delay = self.trigger.failed()
            log.error("checkpoint failed (%s); training continues, retry in %.0fs", exc, delay,
                      extra={"alert": "checkpoint_write_failed", "errno": exc.errno})
            return b"0"
        self.trigger.saved()
        self._saved_ledger, self._saved_step = ledger, self.trainer.steps
        self._ledger.clear()
        self.checkpoints_written += 1
        self.last_checkpoint = info.name
        for warning in info.warnings:
            log.warning("checkpoint %s: %s", info.name, warning)
        return b"1"

    def _collect_cold_tiers(self) -> None:
        """Rank 0 reads which table step the oldest retained checkpoint needs; every shard's
        cold tier drops the versions below it (see Daemon._collect_cold_tiers)."""
        tiers = {n: t.table.cold_tier for n, t in self.trainer.tables.items() if t.table.cold_tier is not None}
        if not tiers:
            return
        steps = None
        if self.leader:
            assert self.store is not None
            manifests = [status.manifest for status in self.store.list_checkpoints()]
            if manifests and all(m is not None and "table_steps" in m.extra for m in manifests):
                steps = {n: min(int(m.extra["table_steps"][n]) for m in manifests) for n in tiers}  # type: ignore[union-attr]
        retain = orjson.loads(self.comm.broadcast_bytes(orjson.dumps(steps) if self.leader else None))
        if retain is None:
            log.warning("a retained checkpoint has no readable table steps: cold-tier versions are kept for now")
            return
        for name, tier in tiers.items():
            tier.retain_from(int(retain[name]))

    # ------------------------------------------------------------------ the loop
    def _agree(self) -> tuple[int | None, int | None, bool, bool]:
        """(watermark floor, forced floor, every rank's input ended, a rank was asked to stop)."""
        joiner = self.pipeline.joiner
        floor, forced = joiner.partition_floor(), joiner.forced_floor()
        ended = self.pipeline.end_of_input or not self.partitions
        low = self.comm.all_min([_NO_FLOOR if floor is None else floor, int(ended)])
        high = self.comm.all_max([_NO_FORCE if forced is None else forced, int(self.stop.is_set())])
        return (None if low[0] == _NO_FLOOR else low[0]), (None if high[0] == _NO_FORCE else high[0]), bool(low[1]), bool(high[1])

    def _train_one(self, batch: SampleBatch) -> None:
        result = self.trainer.step(batch)
        fresh = ~batch["is_correction"]  # correction rows re-emit a scored exposure: monitors see exposures only
        if fresh.any():
            p = result.predictions
            self.monitors.update(p.p_ctr[fresh], p.p_ctcvr[fresh], batch["click"][fresh], batch["convert"][fresh],
                                 batch["sparse"][fresh], batch["dense"][fresh])
        self._ledger.append(batch["sample_id"].copy())
        self.trigger.record(len(batch["sample_id"]))
        # Wall-clock cadence and write failures are rank 0's: it decides for everyone.
        if self.comm.all_max([int(self.leader and self.trigger.due())])[0]:
            self.checkpoint("cadence")

    def _done(self) -> bool:
        return self.stop_after_samples is not None and self.trainer.samples >= self.stop_after_samples

    def run(self) -> WorkerSummary:
        cfg = self.config
        paused = False
        stopped_by = "signal"
        try:
            while True:
                consume = self.monitors.gate.should_consume()
                if consume == paused:
                    (self.pipeline.resume if paused else self.pipeline.pause)()
                    paused = not consume
                if paused:
                    time.sleep(cfg.trainer.poll_timeout_s)
                else:
                    self.pipeline.ingest(cfg.trainer.poll_max_messages, cfg.trainer.poll_timeout_s)
                floor, forced, ended, stop = self._agree()
                if stop:
                    break
                joiner = self.pipeline.joiner
                emitted = self.pipeline.release(joiner.flush() if ended else joiner.advance_to(floor, forced))
                self.buffer.extend(self.samples.gather(emitted))
                while not self._done() and (batch := self.buffer.pop_batch()) is not None:
                    self._train_one(batch)
                if ended and not self._done():
                    if (rest := self.buffer.drain()) is not None:
                        self._train_one(rest)
                    stopped_by = "end_of_input"
                    if self.leader:
                        log.info("end of input on every partition: %d samples trained", self.trainer.samples)
                    break
                if self._done():
                    stopped_by = "stop_after_samples"
                    break
            self.checkpoint("shutdown")
            return WorkerSummary(self.trainer.samples, self.trainer.steps, self.checkpoints_written, self.comm.world,
                                 stopped_by)
        finally:
            self.close()

    def close(self) -> None:
        undelivered = self.pipeline.close(5.0)
        if undelivered:
            log.warning("%d DLQ records could not be delivered at exit (broker unreachable?)", undelivered)
        self.monitors.close()
        if self.store is not None:
            self.store.close()


def _str_keys(offsets: dict[str, dict[int, int]]) -> dict[str, dict[str, int]]:
    return {topic: {str(p): o for p, o in parts.items()} for topic, parts in offsets.items()}
