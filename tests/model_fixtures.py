"""Model-test helpers: a hashed embedding table to inject, and a synthetic world that
emits schema-valid sample batches with a planted, learnable signal.

The world: users and items carry latent factors; ``P(click) = σ(scale·<u, v> + b_item)``,
``P(convert | click) = σ(<u, w> - 1)``. A user's history is drawn from the items it likes
(softmax over ``<u, v>``), so the sequence carries the user's taste too.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from consumers.schema import SAMPLE_FIELDS, Action, SampleBatch, validate_batch

_T0_MS = 1_700_000_000_000  # a realistic epoch, so time arithmetic meets int64-sized values


class HashedEmbedding(nn.Module):
    """Stand-in for the dynamic embedding tables: ``id % (buckets - 1) + 1`` into an
    ``nn.Embedding`` whose row 0 (id 0) is held at zero."""

    def __init__(self, buckets: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(buckets, dim, padding_idx=0)
        nn.init.normal_(self.table.weight[1:], std=0.1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = torch.where(ids == 0, 0, ids % (self.table.num_embeddings - 1) + 1)
        return self.table(rows)


def make_embeddings(dim: int, buckets: int = 4096) -> dict[str, nn.Module]:
    return {key: HashedEmbedding(buckets, dim) for key in ("item", "user", "sparse")}


def to_tensors(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(array) for name, array in batch.items()}


def gap_bucket(gap_ms: np.ndarray, num_buckets: int = 64) -> np.ndarray:
    """1 + floor(log2(1 + seconds)), capped: 0 stays free for "padding / no event"."""
    return np.minimum(1 + np.floor(np.log2(1.0 + gap_ms / 1000.0)), num_buckets - 1).astype(np.int64)


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Rank-sum (Mann-Whitney) AUC; scores are continuous so ties are negligible."""
    ranks = np.empty(len(scores))
    ranks[np.argsort(scores)] = np.arange(1, len(scores) + 1)
    pos = labels > 0.5
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class SyntheticWorld:
    """Latent factors for users 1..n_users and items 1..n_items; :meth:`batch` samples from them."""

    def __init__(
        self, n_users: int = 200, n_items: int = 300, rank: int = 4, scale: float = 2.5, seed: int = 0
    ) -> None:
        rng = np.random.default_rng(seed)
        self.n_users, self.n_items = n_users, n_items
        # Index 0 is unused: ids are 1-based (0 means "empty" in the contract).
        self.user_f = rng.normal(size=(n_users + 1, rank)) / np.sqrt(rank)
        self.item_f = rng.normal(size=(n_items + 1, rank)) / np.sqrt(rank)
        self.cvr_f = rng.normal(size=(n_users + 1, rank)) / np.sqrt(rank)
        self.item_bias = rng.normal(-0.5, 0.5, size=n_items + 1)
        self.item_price = rng.lognormal(3.0, 1.0, size=n_items + 1)
        self.scale = scale

    def click_prob(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        logit = self.scale * (self.user_f[users] * self.item_f[items]).sum(-1) + self.item_bias[items]
        return 1.0 / (1.0 + np.exp(-logit))

    def convert_prob(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        logit = 2.0 * (self.cvr_f[users] * self.item_f[items]).sum(-1) - 1.0
        return 1.0 / (1.0 + np.exp(-logit))

    def batch(
        self,
        rng: np.random.Generator,
        size: int,
        history: int = 12,
        negatives: int = 3,
        corrections: float = 0.0,
    ) -> SampleBatch:
        """A schema-valid batch; ``corrections`` is the share of converted rows re-flagged as
        ``emit_then_correct`` correction samples."""
        b, big_l = size, history
        users = rng.integers(1, self.n_users + 1, size=b)
        items = rng.integers(1, self.n_items + 1, size=b)
        click = (rng.random(b) < self.click_prob(users, items)).astype(np.float32)
        convert = click * (rng.random(b) < self.convert_prob(users, items))
        ts = _T0_MS + rng.integers(0, 30 * 86_400_000, size=b)

        hist_len = rng.integers(0, big_l + 1, size=b)
        real = np.arange(big_l)[None, :] >= (big_l - hist_len)[:, None]  # (B, L) right-aligned
        taste = self.scale * self.user_f[users] @ self.item_f[1:].T  # (B, n_items)
        taste = np.exp(taste - taste.max(1, keepdims=True))
        cdf = np.cumsum(taste / taste.sum(1, keepdims=True), axis=1)
        picks = 1 + (rng.random((b, big_l, 1)) > cdf[:, None, :]).sum(-1).clip(max=self.n_items - 1)
        clicked = rng.random((b, big_l)) < self.click_prob(users[:, None], picks)
        ages = np.cumsum(rng.integers(1_000, 6 * 3_600_000, size=(b, big_l))[:, ::-1], axis=1)[:, ::-1]  # (B, L) ms
        hist_items = np.where(real, picks, 0)
        hist_actions = np.where(real, np.where(clicked, Action.CLICK, Action.EXPOSURE), Action.PAD)
        hist_ts = np.where(real, ts[:, None] - ages, 0)

        def pick(mask: np.ndarray) -> np.ndarray:  # one random history item per row where mask, else 0
            keys = np.where(mask & real, rng.random((b, big_l)), -1.0)
            return np.where(keys.max(1) >= 0, hist_items[np.arange(b), keys.argmax(1)], 0)

        # Hot/cold is not modelled: both click slots draw from clicked history, both exposure
        # slots from the rest; the model only relies on slot order and on 0 = empty.
        rank_package = np.stack(
            [pick(clicked), pick(clicked), pick(~clicked), pick(~clicked), rng.integers(1, self.n_items + 1, size=b)], 1
        )
        neg_items = (items[:, None] + rng.integers(1, self.n_items, size=(b, negatives)) - 1) % self.n_items + 1
        dense = self.item_price[items][:, None].copy()  # (B, 1): the item price
        dense[rng.random(b) < 0.1] = np.nan
        sparse = np.stack([1_000 + users % 4, 2_000 + items % 7, 3_000 + rng.integers(0, 3, size=b)], 1)
        sparse[rng.random(sparse.shape) < 0.05] = 0
        is_correction = (convert > 0) & (rng.random(b) < corrections)
        batch: SampleBatch = {
            "sample_id": rng.integers(1, 2**62, size=b),
            "user": users,
            "item": items,
            "ts": ts,
            "click": click,
            "convert": convert.astype(np.float32),
            "is_correction": is_correction,
            "hour": (ts // 3_600_000) % 24,
            "weekday": (ts // 86_400_000 + 3) % 7,  # 1970-01-01 was a Thursday
            "week": (ts // (7 * 86_400_000)) % 53 + 1,
            "gap_bucket": np.where(hist_len > 0, gap_bucket(ages[:, -1]), 0),
            "hist_len": hist_len,
            "hist_items": hist_items,
            "hist_actions": hist_actions,
            "hist_ts": hist_ts,
            "hist_gap_buckets": np.where(real, gap_bucket(ages), 0),
            "rank_package": rank_package,
            "neg_items": neg_items,
            "sparse": sparse,
            "dense": dense,
            "user_ctr_prior": self.click_prob(users, np.arange(1, self.n_items + 1)[:, None]).mean(0),
            "item_ctr_prior": self.click_prob(np.arange(1, self.n_users + 1)[:, None], items).mean(0),
            "partition": np.zeros(b, dtype=np.int32),
            "offset": np.arange(b),
            "emit_ms": ts + 60_000,
        }
        batch = {name: np.ascontiguousarray(batch[name], dtype=spec.dtype) for name, spec in SAMPLE_FIELDS.items()}
        validate_batch(batch)
        return batch
