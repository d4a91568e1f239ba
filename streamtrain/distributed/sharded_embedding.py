"""A dynamic embedding table sharded by key hash over the ranks, behind the
:class:`~streamtrain.modules.dynamic_embedding.DynamicEmbedding` interface.

Rank ``r`` owns the keys with ``owner(key) == r`` (:func:`owner_of`: splitmix64 of the
key, modulo the world size) in its own :class:`~streamtrain.embedding.EmbeddingTable`
(``self.table``: the shard). One training lookup, every rank together::

    ids -> unique keys (0 = padding stays home) -> all_to_all to their owners
        owner: sum the counts per key over ranks; replicate the admission sketch
               (every shard counts every shard's missing keys first); one training
               lookup of the keys with those counts (admission, rows, scores, pins)
        owner -> all_to_all back: the row of every requested key
    -> an autograd leaf of the requested rows -> F.embedding

and ``apply_gradients``: each rank's leaf gradient goes back to the owners, which sum
the ranks' parts per key (in rank order) and apply the row-wise optimizer once.

What is exact: a shard sees exactly the (key, count) pairs a single table would see for
its keys, at the same step and event time, and its sketch holds the same counts as a
single table's, so admission, new rows (hashed from the key), frequency/recency scores
and optimizer slots evolve per key as in one table. What is not bit-exact: a row's
gradient is summed per rank first, then over ranks, a different float association than
one rank's ``index_add`` (well within float32 rounding per step). Eviction decides per
shard (``max_rows`` is per shard, ties go to the lower row of the shard), so it
matches a single table only while no table evicts. The default row is replicated: with
``default_row="learned"`` its gradient is all-reduced, so every shard applies the same.

Every rank must make the same calls in the same order (the model's forward does: a rank
without samples runs one all-padding row, which sends no key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F

from streamtrain.distributed.comm import Comm
from streamtrain.embedding import DEFAULT_ROW, ColdTier, EmbeddingTableConfig
from streamtrain.embedding.hashing import mix64
from streamtrain.modules.dynamic_embedding import DynamicEmbedding

_OWNER_SALT: Final = 0x5CA1E0  # keeps owners independent of hash-map slots and sketch cells
_ABSENT: Final = DEFAULT_ROW  # Lookup.inverse of a key without a row


def owner_of(keys: torch.Tensor, world: int) -> torch.Tensor:
    """The rank that owns each key (any shape, int64) in a world of ``world``."""
    return torch.remainder(mix64(keys ^ _OWNER_SALT), world)


@dataclass
class _Exchange:
    """One training lookup's routing, kept until its gradients are sent back."""

    order: torch.Tensor  # (n,) positions of this rank's sent keys, sorted by owner
    send_counts: list[int]  # keys sent to each rank
    recv_counts: list[int]  # keys received from each rank
    recv_inverse: torch.Tensor  # (m,) received key -> index into the owner's unique keys
    rows: torch.Tensor  # (U',) the owner's Lookup.rows (reserved rows first)
    key_position: torch.Tensor  # (U,) the owner's unique key -> index into rows
    leaf: torch.Tensor  # (K, D) this rank's rows for its unique keys (row 0 = key 0 when present)
    sent: torch.Tensor  # (K,) bool: which of this rank's unique keys were sent (not padding)


class ShardedDynamicEmbedding(DynamicEmbedding):
    """ids (any shape, int64; 0 = padding) -> ids.shape + (dim,), rows held by their owners."""

    def __init__(self, config: EmbeddingTableConfig, *, comm: Comm, device: torch.device | str = "cpu",
                 cold_tier: ColdTier | None = None) -> None:
        super().__init__(config, device=device, cold_tier=cold_tier)
        self.comm = comm
        self._exchanges: list[_Exchange] = []

    def forward(self, ids: torch.Tensor, *, now_ms: int | None = None) -> torch.Tensor:
        learn = self.training and torch.is_grad_enabled()
        device = self.table.device
        keys, inverse, counts = torch.unique(ids.reshape(-1).to(device), return_inverse=True, return_counts=True)
        sent = keys != 0
        send_keys, send_counts_per_key = keys[sent], counts[sent]
        owners = owner_of(send_keys, self.comm.world)
        order = torch.argsort(owners, stable=True)  # keys stay ascending within each owner
        send_counts = torch.bincount(owners, minlength=self.comm.world).tolist()
        payload = torch.stack([send_keys[order], send_counts_per_key[order]], dim=1)  # (n, 2)
        received, recv_counts = self.comm.all_to_all_rows(payload, send_counts)

        # Owner side: the keys every rank asked for, counted together.
        own_keys, recv_inverse = torch.unique(received[:, 0], return_inverse=True)  # (U,)
        own_counts = torch.zeros_like(own_keys).index_add_(0, recv_inverse, received[:, 1])
        if learn:
            self._count_other_shards_missing(own_keys, own_counts)
            self.table.counters.lookups += int(counts[~sent].sum())  # padding is looked up at home
        hit = self.table.lookup(torch.repeat_interleave(own_keys, own_counts), train=learn, now_ms=now_ms)
        starts = torch.cumsum(own_counts, 0) - own_counts  # first occurrence of each key
        key_position = hit.inverse.index_select(0, starts)  # (U,)
        vectors = self.table.embeddings(hit.rows).index_select(0, key_position).index_select(0, recv_inverse)
        answered, _ = self.comm.all_to_all_rows(vectors, recv_counts, send_counts)  # (n, D), in send order

        leaf = torch.zeros(keys.numel(), self.dim, device=device, dtype=answered.dtype)  # (K, D); padding stays 0
        leaf[sent.nonzero().squeeze(1).index_select(0, order)] = answered
        if learn:
            leaf.requires_grad_()
            self._exchanges.append(_Exchange(order, send_counts, recv_counts, recv_inverse, hit.rows, key_position,
                                             leaf, sent))
        return F.embedding(inverse, leaf).view(*ids.shape, self.dim)

    def _count_other_shards_missing(self, own_keys: torch.Tensor, own_counts: torch.Tensor) -> None:
        """Add every other shard's keys without a row to this shard's admission sketch, so
        that all shards hold the one sketch a single table would (the table then adds its
        own missing keys in its training lookup and reads the estimates)."""
        sketch = self.table.sketch
        if sketch is None or self.comm.alone:
            return
        missing = self.table.lookup(own_keys, train=False).inverse == _ABSENT
        mine = torch.stack([own_keys[missing], own_counts[missing]], dim=1)
        everyone = self.comm.all_gather_rows(mine)
        others = [part for rank, part in enumerate(everyone) if rank != self.comm.rank and part.numel()]
        if others:
            merged = torch.cat(others)
            sketch.add(merged[:, 0], merged[:, 1])

    def apply_gradients(self, lr: float | None = None) -> None:
        """Send each lookup's gradients to the owners, sum them per key, update the shard
        and end its step (every rank, every step, even without gradients)."""
        parts = []
        for ex in self._exchanges:
            grad = ex.leaf.grad if ex.leaf.grad is not None else torch.zeros_like(ex.leaf)
            outgoing = grad[ex.sent].index_select(0, ex.order)
            incoming, _ = self.comm.all_to_all_rows(outgoing, ex.send_counts, ex.recv_counts)  # (m, D) rank by rank
            per_key = torch.zeros(ex.key_position.numel(), self.dim, device=grad.device,
                                  dtype=grad.dtype).index_add_(0, ex.recv_inverse, incoming)
            per_row = torch.zeros(ex.rows.numel(), self.dim, device=grad.device,
                                  dtype=grad.dtype).index_add_(0, ex.key_position, per_key)
            if self.table.config.default_row == "learned":
                self.comm.all_reduce(per_row[DEFAULT_ROW])  # one default row, replicated on every shard
            parts.append((ex.rows, per_row))
        self._exchanges.clear()
        self.table.apply_gradients(parts, lr)
