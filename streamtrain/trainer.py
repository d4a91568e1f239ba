"""The incremental trainer: one prequential step per sample batch.

``step(batch)`` runs the model forward in training mode, backpropagates, updates the
dense parameters (Adam) and the dynamic embedding rows (row-wise optimizers), and
returns a :class:`StepResult`: the predictions of that forward — made *before* this
batch's update, i.e. prequential — and the losses. The same forward serves scoring and
training, so prequential evaluation costs no second pass. The trainer calls nobody: the
runtime hands the result to the monitors, the releases and any hook.

Determinism: everything a step depends on — dense weights, Adam moments, embedding
tables with their optimizer slots and admission sketch, torch's CPU RNG — is in
:meth:`Trainer.state_dict`, and batches arrive in a fixed order (``SampleBatch`` cut by
:class:`~consumers.batching.SampleBuffer`). On CPU with a fixed thread count a replay
from a checkpoint reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from consumers.schema import SampleBatch
from streamtrain.config import StreamtrainConfig
from streamtrain.embedding import ColdTier, EmbeddingTableConfig
from streamtrain.embedding.delta import EmbeddingDelta
from streamtrain.modules.config import ModelConfig
from streamtrain.modules.dynamic_embedding import DynamicEmbedding
from streamtrain.modules.rec_model import EMBEDDING_KEYS, RecModel

FORMAT_VERSION = 1


class EventClockedEmbedding(nn.Module):
    """Passes the batch's event time to a dynamic table (TTL eviction runs on event time,
    never on the wall clock); the model calls it like any embedding."""

    def __init__(self, inner: DynamicEmbedding) -> None:
        super().__init__()
        self.inner = inner
        self.now_ms: int | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner(ids, now_ms=self.now_ms)


EmbeddingFactory = Callable[..., DynamicEmbedding]  # (config, *, device, cold_tier) -> a table module


class Replicas(Protocol):
    """Data parallelism applied from outside (``streamtrain/distributed``): every replica
    steps on the same whole batch, runs its share of the rows through the model, and the
    replicas' gradients meet before the optimizer step."""

    def forward(self, model: RecModel, batch: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """The whole batch's outputs, the loss and its parts, like ``model`` + ``model.loss``."""

    def reduce_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """After backward: make every replica's dense gradients the whole batch's."""


@dataclass(frozen=True)
class Predictions:
    """Prequential predictions of one batch (before the update), on the host."""

    p_ctr: np.ndarray  # (B,)
    p_ctcvr: np.ndarray  # (B,)


@dataclass(frozen=True)
class StepResult:
    """What one training step hands back to the runtime."""

    predictions: Predictions  # prequential: scored before this batch's update
    losses: dict[str, float]  # the step's loss parts (see RecModel.loss)
    seconds: float  # wall time of the step, host <-> device copies included


def build_trainer(config: StreamtrainConfig, device: torch.device,
                  cold_tier: Callable[[str], ColdTier | None] = lambda name: None,
                  embedding: EmbeddingFactory = DynamicEmbedding, replicas: Replicas | None = None) -> Trainer:
    """The trainer a config describes (model, the three tables, dense learning rate, seed);
    ``embedding`` and ``replicas`` are the scale-out seams (``streamtrain/distributed``)."""
    tables = {name: getattr(config.embeddings, name) for name in EMBEDDING_KEYS}
    return Trainer(config.model, tables, learning_rate=config.trainer.learning_rate, seed=config.trainer.seed,
                   device=device, cold_tier=cold_tier, embedding=embedding, replicas=replicas,
                   compile=compile_enabled(config.trainer.compile, device))


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``trainer.compile``: ``auto`` compiles on CUDA only (see ``TrainerConfig.compile``)."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def pick_device(setting: str) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is available")
        return torch.device("cuda")
    return torch.device("cpu")


class Trainer:
    def __init__(
        self,
        model_config: ModelConfig,
        tables: Mapping[str, EmbeddingTableConfig],
        *,
        learning_rate: float,
        seed: int,
        device: torch.device,
        cold_tier: Callable[[str], ColdTier | None] = lambda name: None,
        embedding: EmbeddingFactory = DynamicEmbedding,
        replicas: Replicas | None = None,
        compile: bool = False,
    ) -> None:
        if sorted(tables) != sorted(EMBEDDING_KEYS):
            raise ValueError(f"need embedding tables {EMBEDDING_KEYS}, got {sorted(tables)}")
        self._model_config = model_config
        self._table_configs = dict(tables)
        self._learning_rate = learning_rate
        self._seed = seed
        torch.manual_seed(seed)
        self.device = device
        self.tables = {name: embedding(cfg, device=device, cold_tier=cold_tier(name)) for name, cfg in tables.items()}
        self._clocked = {name: EventClockedEmbedding(t) for name, t in self.tables.items()}
        self.model = RecModel(model_config, self._clocked).to(device)
        if compile:  # compiles at the first step of each new shape class (the daemon's warm-up)
            self.model.compile_encoder()
        # fused: one kernel per parameter instead of ~10 ops each with Python between them (CPU and CUDA).
        self.optimizer = torch.optim.Adam(self.model.dense_parameters(), lr=learning_rate, fused=True)
        # Deterministic mode (the daemon's) also fills every new tensor with NaN, ~1000 memsets a
        # step, to expose reads of uninitialised memory; no op of the step reads any, and the
        # fill does not change a result bit, only the time (~10 % of a CPU step).
        torch.utils.deterministic.fill_uninitialized_memory = False
        self._replicas = replicas  # None: this process trains every row of a batch
        # bf16 autocast on CUDA only: CPU autocast would make CPU runs slower and inexact.
        self._autocast = device.type == "cuda"
        self.steps = 0
        self.samples = 0

    def to_tensors(self, batch: SampleBatch) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(self.device, non_blocking=True) for k, v in batch.items()}

    def step(self, batch: SampleBatch) -> StepResult:
        """Score ``batch`` and train on it; returns the (pre-update) scores and the losses.

        Its phases are named profiler ranges (``step.to_device``, ``step.forward``,
        ``step.loss``, ``step.backward``, ``step.dense_optimizer``, ``step.sparse_update``,
        ``step.to_host``): ``bench.trainer`` splits a step's time by them."""
        started = time.perf_counter()
        with record_function("step.to_device"):
            tensors = self.to_tensors(batch)
        now_ms = int(batch["ts"].max())
        for clocked in self._clocked.values():
            clocked.now_ms = now_ms
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._autocast):
            if self._replicas is None:
                with record_function("step.forward"):
                    outputs = self.model(tensors)
                with record_function("step.loss"):
                    total, parts = self.model.loss(tensors, outputs)
            else:
                with record_function("step.forward"):
                    outputs, total, parts = self._replicas.forward(self.model, tensors)
        scores = torch.stack([outputs["p_ctr"].detach(), outputs["p_ctcvr"].detach()]).float()  # (2, B)
        with record_function("step.backward"):
            total.backward()
        if self._replicas is not None:
            with record_function("step.reduce_gradients"):
                self._replicas.reduce_gradients(self.model.dense_parameters())
        with record_function("step.dense_optimizer"):
            self.optimizer.step()
        with record_function("step.sparse_update"):
            for table in self.tables.values():
                table.apply_gradients()
        self.steps += 1
        self.samples += len(batch["sample_id"])
        # The observers' host copy, last: on CUDA it is the step's closing sync.
        with record_function("step.to_host"):
            host = scores.cpu().numpy()
            losses = {name: float(value) for name, value in parts.items()}
        return StepResult(Predictions(host[0], host[1]), losses, time.perf_counter() - started)

    def frozen_copy(self) -> "Trainer":
        """A scoring-only copy of this model (weights and tables, no cold tier, fresh
        optimizer): the shadow that a release candidate is compared with. Building it
        leaves the global torch RNG as it was (training randomness is part of the state)."""
        with torch.random.fork_rng(devices=[]):
            copy = Trainer(self._model_config, self._table_configs, learning_rate=self._learning_rate,
                           seed=self._seed, device=self.device)
        copy.load_state_dict(self.state_dict(), model_only=True)
        return copy

    @torch.no_grad()
    def predict(self, batch: SampleBatch) -> Predictions:
        """Pure scoring (no admission, no update): used by the shadow check."""
        self.model.eval()
        outputs = self.model(self.to_tensors(batch))
        return Predictions(outputs["p_ctr"].float().cpu().numpy(), outputs["p_ctcvr"].float().cpu().numpy())

    def dense_state(self) -> dict[str, torch.Tensor]:
        """Dense weights only (the model without its embedding tables), detached copies."""
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if not k.startswith("embeddings.")}

    def state_dict(self) -> dict[str, Any]:
        opt = self.optimizer.state_dict()
        return {
            "format_version": FORMAT_VERSION,
            "steps": self.steps,
            "samples": self.samples,
            "dense": self.dense_state(),
            # Optimizer state keyed by parameter index as strings: JSON object keys are strings.
            "optimizer": {"state": {str(i): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                                    for i, s in opt["state"].items()},
                          "param_groups": [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
                                           for g in opt["param_groups"]]},
            "rng": torch.get_rng_state().clone(),
            "tables": {name: t.table.state_dict() for name, t in self.tables.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any], *, model_only: bool = False) -> None:
        """Restore a trainer. ``model_only`` (warm start) takes weights and tables but keeps
        this trainer's fresh counters; shape mismatches raise with the offending names."""
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"trainer state format {state.get('format_version')} != {FORMAT_VERSION}")
        self._load_dense(state["dense"])
        for name, table in self.tables.items():
            table.table.load_state_dict(state["tables"][name])
        opt = state["optimizer"]
        self.optimizer.load_state_dict({
            "state": {int(i): dict(s) for i, s in opt["state"].items()},
            "param_groups": [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in opt["param_groups"]],
        })
        for group in self.optimizer.param_groups:  # checkpoints of older versions stored fused=None
            group["fused"] = True
        if model_only:
            return
        self.steps = int(state["steps"])
        self.samples = int(state["samples"])
        torch.set_rng_state(state["rng"])

    def load_published(self, dense: Mapping[str, torch.Tensor], snapshots: Mapping[str, EmbeddingDelta]) -> None:
        """Hold a published version's model (dense weights + table snapshots), for scoring."""
        self._load_dense(dense)
        for name, table in self.tables.items():
            table.table.load_snapshot(snapshots[name])

    def _load_dense(self, dense: Mapping[str, torch.Tensor]) -> None:
        own = self.dense_state()
        problems = [f"{k}: missing" for k in own if k not in dense]
        problems += [f"{k}: unexpected" for k in dense if k not in own]
        problems += [f"{k}: shape {tuple(dense[k].shape)} vs model {tuple(v.shape)}"
                     for k, v in own.items() if k in dense and dense[k].shape != v.shape]
        if problems:
            raise ValueError("checkpoint does not fit this model config:\n  " + "\n  ".join(problems))
        self.model.load_state_dict(dict(dense), strict=False)
