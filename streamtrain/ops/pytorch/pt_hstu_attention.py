"""Reference HSTU attention in plain PyTorch (fp32), and the softmax variant.

Shapes (one convention for every backend)::

    q, k:        (B, N, H, Dqk)   per-head queries / keys, sequence-major like the projection
    v:           (B, N, H, Dv)
    bias:        (B, H, N, N)     relative attention bias (rab), already gathered
    valid_start: (B,) int64       first real position of each row; positions before it are
                                  left padding (histories are right-aligned, schema.py)
    returns      (B, N, H, Dv)

Query ``i`` attends to key ``j`` iff ``valid_start[b] <= j <= i`` (left padding + causal).
Padded query rows therefore attend to nothing and come out as exact zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(valid_start: torch.Tensor, n: int) -> torch.Tensor:
    """(B, 1, N, N) bool: key ``j`` visible to query ``i`` iff ``valid_start <= j <= i``."""
    pos = torch.arange(n, device=valid_start.device)
    causal = pos[None, :] <= pos[:, None]  # (N, N)
    real_key = pos[None, :] >= valid_start[:, None]  # (B, N)
    return (causal[None] & real_key[:, None, :]).unsqueeze(1)


def _scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(α Q) Kᵀ + rab`` in fp32: (B, H, N, N). Scaling Q (N·Dqk) rather than the scores
    (N·N) saves a full pass over the largest tensor, forward and backward."""
    qh = (q.float() * alpha).transpose(1, 2)  # (B, H, N, Dqk)
    kh = k.float().transpose(1, 2)  # (B, H, N, Dqk)
    return torch.matmul(qh, kh.transpose(-1, -2)).add_(bias.float())


def pytorch_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    valid_start: torch.Tensor,
    *,
    alpha: float,
    inv_n: float,
) -> torch.Tensor:
    """Pointwise HSTU attention ``(SiLU(Q Kᵀ α + rab) / n) V`` with the causal/padding mask.

    ``inv_n`` is ``1 / n``: a constant, not the row's length, so adding left padding to a
    batch never rescales the outputs of real positions.
    """
    n = q.shape[1]
    mask = attention_mask(valid_start, n)  # (B, 1, N, N)
    weights = torch.where(mask, F.silu(_scores(q, k, bias, alpha)), 0.0)  # (B, H, N, N)
    out = torch.matmul(weights, v.float().transpose(1, 2))  # (B, H, N, Dv)
    return (out * inv_n).transpose(1, 2).to(v.dtype)  # 1/n on the output: N·Dv, not N·N, values


def pytorch_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    valid_start: torch.Tensor,
    *,
    alpha: float,
) -> torch.Tensor:
    """Softmax attention over the same mask and bias (the ablation of HSTU's pointwise form).

    Masked scores are filled with a finite minimum (not -inf, whose all-masked rows would
    give NaN values and gradients) and the weights re-masked, so padded queries return zeros.
    """
    n = q.shape[1]
    mask = attention_mask(valid_start, n)  # (B, 1, N, N)
    scores = _scores(q, k, bias, alpha).masked_fill(~mask, torch.finfo(torch.float32).min)
    weights = torch.softmax(scores, dim=-1) * mask  # (B, H, N, N)
    out = torch.matmul(weights, v.float().transpose(1, 2))  # (B, H, N, Dv)
    return out.transpose(1, 2).to(v.dtype)
