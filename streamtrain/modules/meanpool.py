"""The ablation of the sequence encoder: a causal running mean of the inputs instead of HSTU.

Same contract as :class:`~streamtrain.modules.hstu.HSTUEncoder` (right-aligned, left-padded
sequences; outputs zero on padding; position ``i`` sees only real positions ``<= i``), so
``RecModel`` can swap one for the other (``model.sequence_encoder``). It has no attention,
no relative bias and no parameters but a final norm: what the history contributes when
every event counts the same.
"""

from __future__ import annotations

import torch
from torch import nn

from streamtrain.modules.hstu import make_norm


class MeanPoolEncoder(nn.Module):
    def __init__(self, dim: int, norm: str) -> None:
        super().__init__()
        self.norm_out = make_norm(norm, dim)

    def forward(self, x: torch.Tensor, ts: torch.Tensor, valid_len: torch.Tensor) -> torch.Tensor:
        """x: (B, N, D); ts: (B, N) (unused: the mean has no notion of time); valid_len: (B,)
        real positions at the right end. Returns (B, N, D): the mean of the real inputs up to
        each position, exact zeros on padding."""
        n = x.shape[1]
        real = (torch.arange(n, device=x.device)[None, :] >= (n - valid_len)[:, None]).unsqueeze(-1)  # (B, N, 1)
        running = torch.cumsum(x * real, dim=1)  # (B, N, D)
        count = torch.cumsum(real.to(x.dtype), dim=1).clamp(min=1.0)  # (B, N, 1)
        return self.norm_out(running / count) * real
