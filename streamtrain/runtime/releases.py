"""When and what to publish: cadence, the gate, the shadow check and the rollback action.

The gate is the only way to publish (DESIGN §6.3): :meth:`ReleaseManager.decide` never
schedules a release unless ``gate.publish_allowed()``.

One release, as the runtime drives it (the flow is one-way: the manager never calls back)::

    after each step:   observe(batch, predictions)      shadow window (prequential scores)
                       account(samples, gate)           cadence, rollback requests
    when decide(gate) is True:                          a release is now *pending* (in the state)
                       runtime writes the checkpoint of this step
                       publish_pending(trainer, ckpt)   the version names that checkpoint

So a version always holds the weights of the checkpoint it names. A crash between the
checkpoint and the publish leaves the pending release in the checkpoint; the restart
publishes it before training on. Publishing is idempotent per checkpoint: a version that
already names the checkpoint is reused, so a replay never publishes the same model twice.

Shadow check. Over the last ``shadow_window`` samples before a release is due, every
batch is also scored by a frozen copy of the last released model. Both score the batch
before the candidate trains on it (prequential), so both are judged on held-out data. The
release goes ahead only if the candidate's log-loss is not worse than the shadow's by more
than ``shadow_tolerance``; otherwise it is held (counted, logged) and the cadence restarts.
The window and the name of the version the shadow copies are part of the state: after a
restart the shadow is rebuilt from that version's files, so the check replays exactly.
Only the wall-clock cadence (``every_seconds``) depends on when things ran.

A version holds the dense weights, every embedding table in full (Parquet: key, row),
the FAISS item index, and a manifest with the checkpoint it came from, the monitors'
status at release and the shadow-check result.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save as safetensors_bytes

from consumers.schema import SampleBatch
from monitors.gate import Gate
from monitors.stats import log_loss
from streamtrain.config import PublishingConfig
from streamtrain.embedding.delta import read_parquet, to_arrow
from streamtrain.runtime.publisher import PublishedVersion, Publisher
from streamtrain.retrieval.index import RetrievalIndex
from streamtrain.trainer import Predictions, Trainer

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: pending release, shadow window and shadow version in the state

DENSE_FILE = "dense.safetensors"
INDEX_FILE = "items.faiss"


def table_file(name: str) -> str:
    return f"embedding-{name}.parquet"


@dataclass
class ShadowWindow:
    """Scores of the candidate and of the shadow, with the labels, before a release."""

    candidate: list[np.ndarray] = field(default_factory=list)
    current: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def add(self, candidate: np.ndarray, current: np.ndarray, labels: np.ndarray) -> None:
        self.candidate.append(candidate)
        self.current.append(current)
        self.labels.append(labels)

    def result(self) -> dict[str, float] | None:
        if not self.labels:
            return None
        y = np.concatenate(self.labels)
        return {"samples": float(len(y)),
                "candidate_logloss": log_loss(np.concatenate(self.candidate), y),
                "current_logloss": log_loss(np.concatenate(self.current), y)}

    def state_dict(self) -> dict[str, np.ndarray]:
        def joined(parts: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)

        return {"candidate": joined(self.candidate), "current": joined(self.current), "labels": joined(self.labels)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ShadowWindow:
        window = cls()
        if len(state["labels"]):
            window.add(*(np.asarray(state[k], np.float32) for k in ("candidate", "current", "labels")))
        return window


def table_snapshot(trainer: Trainer, name: str) -> bytes:
    """Every live row of one table as Parquet bytes (the embedding delta format, no tombstones)."""
    buffer = io.BytesIO()
    pq.write_table(to_arrow(trainer.tables[name].table.snapshot()), buffer)
    return buffer.getvalue()


@torch.no_grad()
def item_index(trainer: Trainer) -> bytes:
    table = trainer.tables["item"].table
    keys = table.row_keys[(table.row_keys != 0)]
    if keys.numel() == 0:
        return b""
    trainer.model.eval()
    vectors = trainer.model.item_vectors(keys).float().cpu().numpy()
    return RetrievalIndex.build(keys.cpu().numpy(), vectors, device="cpu").to_bytes()


def version_files(trainer: Trainer) -> dict[str, bytes]:
    files = {DENSE_FILE: safetensors_bytes(trainer.dense_state())}
    files |= {table_file(name): table_snapshot(trainer, name) for name in trainer.tables}
    files[INDEX_FILE] = item_index(trainer)
    return files


def scoring_copy(template: Trainer, version: PublishedVersion) -> Trainer:
    """A scoring-only trainer holding exactly the model of a published version."""
    copy = template.frozen_copy()
    dense = load_safetensors(str(version.path / DENSE_FILE))
    snapshots = {name: read_parquet(version.path / table_file(name)) for name in template.tables}
    copy.load_published(dense, snapshots)
    return copy


class Scorer(Protocol):
    """What the shadow check needs of a model: prequential-free scoring."""

    def predict(self, batch: SampleBatch) -> Predictions: ...


class ReleaseManager:
    """``shadow_of`` makes the frozen copy of a just-released trainer (a seam for tests)."""

    def __init__(self, config: PublishingConfig, publisher: Publisher, *,
                 shadow_of: Callable[[Trainer], Scorer] = Trainer.frozen_copy,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.publisher = publisher
        self._shadow_of = shadow_of
        self._clock = clock
        self._last_release_wall = clock()
        self._shadow: Scorer | None = None
        self.shadow_version: str | None = None  # the version the shadow copies
        self._window = ShadowWindow()
        self.pending: dict[str, Any] | None = None  # a release decided at this step, not yet published
        self.samples_since_release = 0
        self.released = 0
        self.held = 0
        self.rollbacks = 0
        self.failures = 0

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "samples_since_release": self.samples_since_release,
                "released": self.released, "held": self.held, "rollbacks": self.rollbacks, "failures": self.failures,
                "pending": self.pending, "shadow_version": self.shadow_version, "window": self._window.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any], template: Trainer) -> None:
        """Restore; ``template`` (the restored trainer) is used to rebuild the shadow from
        the version it copied. A version pruned since leaves no shadow (logged)."""
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"releases state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        self.samples_since_release = int(state["samples_since_release"])
        self.released, self.held = int(state["released"]), int(state["held"])
        self.rollbacks, self.failures = int(state["rollbacks"]), int(state["failures"])
        self.pending = None if state["pending"] is None else dict(state["pending"])
        self._window = ShadowWindow.from_state(state["window"])
        self.shadow_version = state["shadow_version"]
        self._shadow = None
        if self.shadow_version is not None and self.config.shadow_window > 0:
            version = self.publisher.version(self.shadow_version)
            if version is None:
                log.warning("shadow version %s is gone: the next release is not shadow-checked", self.shadow_version)
            else:
                self._shadow = scoring_copy(template, version)

    # ------------------------------------------------------------------ per step
    def _shadow_active(self) -> bool:
        due_in = self.config.every_samples - self.samples_since_release
        return self.config.shadow_window > 0 and self._shadow is not None and due_in <= self.config.shadow_window

    def observe(self, batch: SampleBatch, candidate: Predictions) -> None:
        """The candidate's prequential scores of ``batch`` (made before it trained on it)."""
        if self._shadow_active():
            assert self._shadow is not None
            self._window.add(candidate.p_ctr, self._shadow.predict(batch).p_ctr, batch["click"])

    def account(self, batch_size: int, gate: Gate, samples_now: int) -> None:
        """After each step: count towards the cadence; act on a rollback the gate asked for."""
        self.samples_since_release += batch_size
        if gate.rollback_requested:
            self._rollback(samples_now)
            gate.ack_rollback()

    def decide(self, gate: Gate) -> bool:
        """Is a release due, allowed and not worse than the shadow? True makes it pending:
        the runtime checkpoints this step, then calls :meth:`publish_pending`."""
        if not (self._due() and gate.publish_allowed()):
            return False
        self._last_release_wall = self._clock()
        shadow = self._window.result()
        self._window = ShadowWindow()
        self.samples_since_release = 0
        if shadow is not None and shadow["candidate_logloss"] > shadow["current_logloss"] + self.config.shadow_tolerance:
            self.held += 1
            log.warning("release held by the shadow check", extra={"shadow": shadow})
            return False
        self.pending = {"shadow": shadow}
        return True

    def publish_pending(self, trainer: Trainer, checkpoint: str | None, meta: Mapping[str, Any]) -> PublishedVersion | None:
        """Publish the pending release as a version naming ``checkpoint`` (the checkpoint of
        this very step), or reuse a version that already names it (a replay)."""
        if self.pending is None:
            return None
        shadow, self.pending = self.pending["shadow"], None
        existing = self.publisher.find(checkpoint=checkpoint) if checkpoint is not None else None
        try:
            version = existing or self.publisher.publish(
                version_files(trainer), {**meta, "checkpoint": checkpoint, "samples": trainer.samples, "shadow": shadow})
        except OSError as exc:
            self.failures += 1
            log.error("release failed (%s); the next one follows the cadence", exc, extra={"alert": "release_failed"})
            return None
        self.released += 1
        if self.config.shadow_window > 0:  # the frozen copy costs a full model copy
            self._shadow = self._shadow_of(trainer)
            self.shadow_version = version.name
        if existing is None:
            log.info("published %s", version.name, extra={"version": version.name, "samples": trainer.samples})
        else:
            log.info("%s already holds %s: not published again", version.name, checkpoint)
        return version

    def drop_pending(self, why: str) -> None:
        """Give up the pending release (counted as a failure); the cadence goes on."""
        if self.pending is not None:
            self.pending = None
            self.failures += 1
            log.error("release dropped: %s", why, extra={"alert": "release_failed"})

    def _due(self) -> bool:
        """Every ``every_samples`` samples, or ``every_seconds`` of wall time (publication
        timing never changes what is trained, so a wall-clock cadence is safe here)."""
        if self.samples_since_release >= self.config.every_samples:
            return True
        seconds = self.config.every_seconds
        return seconds is not None and self.samples_since_release > 0 and self._clock() - self._last_release_wall >= seconds

    def _rollback(self, samples_now: int) -> None:
        """Point CURRENT at the newest version released at least ``rollback_margin_samples``
        before now: versions released shortly before the freeze may already carry the drift."""
        cutoff = samples_now - self.config.rollback_margin_samples
        good = [v for v in self.publisher.versions() if int(v.manifest.get("samples", 0)) <= cutoff]
        if not good:
            log.warning("gate asked for a rollback but no version was released before sample %d", cutoff)
            return
        current = self.publisher.current()
        if current is None or current.name != good[-1].name:
            self.publisher.rollback(good[-1].name)
            self.rollbacks += 1
            log.warning("rolled CURRENT back to %s", good[-1].name)
