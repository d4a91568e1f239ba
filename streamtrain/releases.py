"""When and what to publish: cadence, the gate, the shadow check and the rollback action.

The gate is the only way to publish (DESIGN §6.3): :meth:`ReleaseManager.after_step`
returns without writing anything unless ``gate.publish_allowed()``.

Shadow check. Over the last ``shadow_window`` samples before a release is due, every
batch is also scored by a frozen copy of the CURRENT version. Both score the batch before
the candidate trains on it (prequential), so both are judged on held-out data. The
release goes ahead only if the candidate's log-loss is not worse than CURRENT's by more
than ``shadow_tolerance``; otherwise it is held (counted, logged) and the cadence restarts.

A version holds the dense weights, every embedding table in full (Parquet: key, row),
the FAISS item index, and a manifest with the checkpoint it came from, the monitors'
status at release and the shadow-check result.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import save as safetensors_bytes

from consumers.schema import SampleBatch
from monitors.gate import Gate
from monitors.stats import log_loss
from streamtrain.config import PublishingConfig
from streamtrain.embedding.delta import to_arrow
from streamtrain.publisher import PublishedVersion, Publisher
from streamtrain.retrieval_index import RetrievalIndex
from streamtrain.trainer import Predictions, Trainer

log = logging.getLogger(__name__)

@dataclass
class _ShadowWindow:
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
    files = {"dense.safetensors": safetensors_bytes(trainer.dense_state())}
    files |= {f"embedding-{name}.parquet": table_snapshot(trainer, name) for name in trainer.tables}
    files["items.faiss"] = item_index(trainer)
    return files


class ReleaseManager:
    def __init__(self, config: PublishingConfig, publisher: Publisher, shadow_factory: Callable[[Trainer], Trainer],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._last_release_wall = clock()
        self.publisher = publisher
        self._shadow_factory = shadow_factory  # builds a frozen copy of a trainer's model
        self._shadow: Trainer | None = None
        self._window = _ShadowWindow()
        self.samples_since_release = 0
        self.released = 0
        self.held = 0
        self.rollbacks = 0

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": 1, "samples_since_release": self.samples_since_release,
                "released": self.released, "held": self.held, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.samples_since_release = int(state["samples_since_release"])
        self.released, self.held, self.rollbacks = int(state["released"]), int(state["held"]), int(state["rollbacks"])

    def _shadow_active(self) -> bool:
        due_in = self.config.every_samples - self.samples_since_release
        return self.config.shadow_window > 0 and self._shadow is not None and due_in <= self.config.shadow_window

    def observe(self, batch: SampleBatch, candidate: Predictions) -> None:
        """Prequential hook: called with the candidate's scores before it trains on ``batch``."""
        if self._shadow_active():
            assert self._shadow is not None
            self._window.add(candidate.p_ctr, self._shadow.predict(batch).p_ctr, batch["click"])

    def after_step(self, trainer: Trainer, gate: Gate, batch_size: int, meta: Callable[[], dict[str, Any]]) -> PublishedVersion | None:
        """Called after each training step; publishes when due, allowed and not worse."""
        self.samples_since_release += batch_size
        if gate.rollback_requested:
            self._rollback(trainer.samples)
            gate.ack_rollback()
        if not (self._due() and gate.publish_allowed()):
            return None
        self._last_release_wall = self._clock()
        shadow = self._window.result()
        self._window = _ShadowWindow()
        self.samples_since_release = 0
        if shadow is not None and shadow["candidate_logloss"] > shadow["current_logloss"] + self.config.shadow_tolerance:
            self.held += 1
            log.warning("release held by the shadow check", extra={"shadow": shadow})
            return None
        version = self.publisher.publish(version_files(trainer), {**meta(), "samples": trainer.samples, "shadow": shadow})
        self.released += 1
        if self.config.shadow_window > 0:  # the frozen copy of CURRENT costs a full model copy
            self._shadow = self._shadow_factory(trainer)
        log.info("published %s", version.name, extra={"version": version.name, "samples": trainer.samples})
        return version

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
