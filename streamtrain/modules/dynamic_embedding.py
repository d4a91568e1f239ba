"""Dynamic embeddings as nn.Modules: use them like ``nn.Embedding`` / ``nn.EmbeddingBag``.

Training step, as the trainer drives it::

    model.train()
    out = emb(ids, now_ms=batch_max_ts)     # admits ids, output is autograd-connected
    loss(out).backward()                    # grads land on a per-call leaf of unique rows
    emb.apply_gradients(lr)                 # row-wise sparse update, ends the table's step

A forward *mutates the table* (admission counts, new rows, scores) only when it can
train: ``self.training`` and grad enabled. In ``eval()`` mode or under
``torch.no_grad()`` it is a pure read and ids without a row read the default row, so
prequential scoring never admits what it scores. Call ``apply_gradients`` exactly once
per training step, even with no gradient: it ends the step (releases pinned rows, runs
periodic eviction).

The table's tensors are not parameters (dense optimizers must not touch them) nor
buffers (their row count changes): checkpoint ``module.table.state_dict()``, and build
the module on its device (``.to()`` does not move the table).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from streamtrain.embedding import ColdTier, EmbeddingTable, EmbeddingTableConfig
from streamtrain.embedding.hashing import mix64


def hash_bucket(ids: torch.Tensor, buckets: int) -> torch.Tensor:
    """Ids (int64, any shape) -> buckets 1..``buckets`` by splitmix64, 0 (padding) kept."""
    return torch.where(ids == 0, 0, torch.remainder(mix64(ids), buckets) + 1)


class DynamicEmbedding(nn.Module):
    """ids (any shape, int64; 0 = padding) -> ids.shape + (dim,)."""

    def __init__(self, config: EmbeddingTableConfig, *, device: torch.device | str = "cpu", cold_tier: ColdTier | None = None) -> None:
        super().__init__()
        self.table = EmbeddingTable(config, device=device, cold_tier=cold_tier)
        self._buckets = config.hash_buckets
        # One (rows (U,), leaf (U, D)) per training forward of this step; the leaf's grad is
        # the coalesced gradient of its rows (autograd sums duplicate ids).
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def dim(self) -> int:
        return self.table.dim

    def forward(self, ids: torch.Tensor, *, now_ms: int | None = None) -> torch.Tensor:
        learn = self.training and torch.is_grad_enabled()
        if self._buckets is not None:
            ids = hash_bucket(ids, self._buckets)
        hit = self.table.lookup(ids, train=learn, now_ms=now_ms)
        rows = self.table.embeddings(hit.rows)  # (U, D)
        if learn:
            rows.requires_grad_()
            self._pending.append((hit.rows, rows))
        return F.embedding(hit.inverse, rows)  # ids.shape + (D,)

    def apply_gradients(self, lr: float | None = None) -> None:
        """Apply the step's gradients row-wise (``lr``: this step's rate, default the config's)."""
        parts = [(rows, leaf.grad) for rows, leaf in self._pending if leaf.grad is not None]
        self._pending.clear()
        self.table.apply_gradients(parts, lr)


class DynamicEmbeddingBag(DynamicEmbedding):
    """ids (..., L) int64, 0 = padding -> pooled (..., dim) over the last dim.

    ``mean`` divides by the number of non-padding ids (ids without a row still count:
    they read the default row); an all-padding bag pools to zeros.
    """

    def __init__(
        self,
        config: EmbeddingTableConfig,
        *,
        mode: Literal["sum", "mean"] = "mean",
        device: torch.device | str = "cpu",
        cold_tier: ColdTier | None = None,
    ) -> None:
        super().__init__(config, device=device, cold_tier=cold_tier)
        self.mode = mode

    def forward(self, ids: torch.Tensor, *, now_ms: int | None = None) -> torch.Tensor:
        pooled = super().forward(ids, now_ms=now_ms).sum(-2)  # (..., D); padding rows are zero
        if self.mode == "mean":
            pooled = pooled / (ids != 0).sum(-1, keepdim=True).clamp_min(1).to(pooled.dtype)
        return pooled
