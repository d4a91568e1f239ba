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
        running, count, real = self._running(x, valid_len)
        return self.norm_out(running / count.clamp(min=1.0)) * real

    def forward_with_targets(
        self,
        x: torch.Tensor,
        ts: torch.Tensor,
        valid_len: torch.Tensor,
        owner: torch.Tensor,
        target: torch.Tensor,
        target_ts: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`HSTUEncoder.forward_with_targets`'s contract: (U, M, D) histories read by (B, D)
        targets through ``owner`` (B,) → history outputs (U, M, D), target outputs (B, D)."""
        running, count, real = self._running(x, valid_len)
        history = self.norm_out(running / count.clamp(min=1.0)) * real
        total = running[:, -1].index_select(0, owner) + target  # (B, D)
        return history, self.norm_out(total / (count[:, -1].index_select(0, owner) + 1.0))

    @staticmethod
    def _running(x: torch.Tensor, valid_len: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Running sums (B, N, D) and counts (B, N, 1) of the real inputs, and the real mask (B, N, 1)."""
        n = x.shape[1]
        real = (torch.arange(n, device=x.device)[None, :] >= (n - valid_len)[:, None]).unsqueeze(-1)  # (B, N, 1)
        return torch.cumsum(x * real, dim=1), torch.cumsum(real.to(x.dtype), dim=1), real
