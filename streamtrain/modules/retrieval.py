"""Two-tower retrieval head: sampled-softmax (InfoNCE) loss and rank-package loss.

User and item vectors are L2-normalised, so a score is a cosine divided by the
temperature and top-K retrieval is a maximum-inner-product search (``streamtrain/retrieval/index.py``).

Candidates of row ``b``: its positive item, its own negatives (rank package + random
negatives) and, optionally, every row's item (in-batch negatives). A candidate is masked
when its id is 0 (empty slot) or equals the row's positive id (a duplicate of the
positive is not a negative; this also removes the in-batch diagonal).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from streamtrain.modules.config import RetrievalConfig


class RetrievalHead(nn.Module):
    """Linear user and item towers onto the unit sphere of dimension ``cfg.dim``."""

    def __init__(self, cfg: RetrievalConfig, user_in: int, item_in: int) -> None:
        super().__init__()
        self.user_proj = nn.Linear(user_in, cfg.dim)
        self.item_proj = nn.Linear(item_in, cfg.dim)

    def user_vectors(self, user_features: torch.Tensor) -> torch.Tensor:
        """(..., user_in) → (..., dim), unit norm."""
        return F.normalize(self.user_proj(user_features), dim=-1)

    def item_vectors(self, item_embeddings: torch.Tensor) -> torch.Tensor:
        """(..., item_in) → (..., dim), unit norm."""
        return F.normalize(self.item_proj(item_embeddings), dim=-1)


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ w·v / Σ w, and 0 (still attached to the graph) when no row has weight."""
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def info_nce_loss(
    user_vec: torch.Tensor,
    pos_vec: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_vec: torch.Tensor,
    neg_ids: torch.Tensor,
    row_weight: torch.Tensor,
    temperature: float,
    in_batch: bool,
) -> torch.Tensor:
    """Sampled softmax: ``-log softmax(scores)[positive]`` averaged with ``row_weight``.

    user_vec, pos_vec: (B, d); pos_ids: (B,); neg_vec: (B, M, d); neg_ids: (B, M);
    row_weight: (B,) (0 drops a row, e.g. an exposure without a click).
    """
    pos = (user_vec * pos_vec).sum(-1, keepdim=True)  # (B, 1)
    own = torch.einsum("bd,bmd->bm", user_vec, neg_vec)  # (B, M)
    own = own.masked_fill((neg_ids == 0) | (neg_ids == pos_ids[:, None]), float("-inf"))
    parts = [pos, own]
    if in_batch:
        others = user_vec @ pos_vec.T  # (B, B): column j is row j's item
        parts.append(others.masked_fill(pos_ids[None, :] == pos_ids[:, None], float("-inf")))
    logits = torch.cat(parts, dim=1) / temperature  # (B, 1 + M [+ B]); the positive is never masked
    per_row = torch.logsumexp(logits, dim=1) - logits[:, 0]  # (B,)
    return _weighted_mean(per_row, row_weight)


def rank_package_loss(
    scores: torch.Tensor,
    grades: torch.Tensor,
    valid: torch.Tensor,
    row_weight: torch.Tensor,
    kind: Literal["pairwise", "listwise"],
) -> torch.Tensor:
    """Order the candidates of each row by grade.

    scores: (B, C) logits; grades: (C,) or (B, C); valid: (B, C) bool; row_weight: (B,).
    ``pairwise``: mean over valid pairs with ``g_i > g_j`` of ``softplus(s_j - s_i)``
    (RankNet / BPR). ``listwise``: ListNet, cross entropy between ``softmax(grades)`` and
    ``softmax(scores)`` over the valid candidates.
    """
    grades = grades.to(scores.dtype).expand_as(scores)
    if kind == "pairwise":
        better = (grades[:, :, None] > grades[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (B, C, C)
        pair_loss = F.softplus(scores[:, None, :] - scores[:, :, None])  # [b, i, j] = softplus(s_j - s_i)
        n_pairs = better.sum(dim=(1, 2))  # (B,)
        per_row = (pair_loss * better).sum(dim=(1, 2)) / n_pairs.clamp(min=1)
        return _weighted_mean(per_row, row_weight * (n_pairs > 0))
    # A finite fill, not -inf: a row with no valid candidate must give 0, not NaN gradients.
    lowest = torch.finfo(scores.dtype).min
    target = torch.softmax(grades.masked_fill(~valid, lowest), dim=1)  # (B, C)
    log_model = torch.log_softmax(scores.masked_fill(~valid, lowest), dim=1)
    per_row = -(target * torch.where(valid, log_model, 0.0)).sum(dim=1)  # (B,)
    return _weighted_mean(per_row, row_weight)
