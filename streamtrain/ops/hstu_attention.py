"""HSTU attention: one entry point, dispatched on :class:`Kernel`.

The PyTorch reference (``ops/pytorch/pt_hstu_attention.py``) is the default and the CPU
implementation; the Triton kernel (``ops/triton/triton_hstu_attention.py``) is imported
only when asked for. A backend that cannot run raises: nothing stands in silently.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

import torch

from streamtrain.ops.pytorch.pt_hstu_attention import pytorch_hstu_attention, pytorch_softmax_attention


class Kernel(str, Enum):
    PYTORCH = "pytorch"
    TRITON = "triton"


def resolve_kernel(choice: Literal["auto", "pytorch", "triton"], device: torch.device) -> Kernel:
    """``auto`` is a fixed policy, not a fallback: Triton on CUDA tensors, PyTorch elsewhere.

    On CUDA without triton installed, ``auto`` therefore raises at the first call instead of
    quietly running the slower reference.
    """
    if choice == "auto":
        return Kernel.TRITON if device.type == "cuda" else Kernel.PYTORCH
    return Kernel(choice)


def _check_shapes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, valid_start: torch.Tensor
) -> None:
    b, n, h, _ = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k has shape {tuple(k.shape)}, q has {tuple(q.shape)}")
    if v.shape[:3] != (b, n, h):
        raise ValueError(f"v has shape {tuple(v.shape)}, expected ({b}, {n}, {h}, Dv)")
    if bias.shape != (b, h, n, n):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected {(b, h, n, n)}")
    if valid_start.shape != (b,):
        raise ValueError(f"valid_start has shape {tuple(valid_start.shape)}, expected ({b},)")


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    valid_start: torch.Tensor,
    *,
    alpha: float,
    inv_n: float,
    kernel: Kernel = Kernel.PYTORCH,
) -> torch.Tensor:
    """``(SiLU(Q Kᵀ α + rab) / n) V`` under the causal + left-padding mask.

    q, k: (B, N, H, Dqk); v: (B, N, H, Dv); bias: (B, H, N, N); valid_start: (B,) int64.
    Returns (B, N, H, Dv). Raises ImportError if ``kernel`` is TRITON and triton is absent.
    """
    _check_shapes(q, k, v, bias, valid_start)
    if kernel is Kernel.PYTORCH:
        return pytorch_hstu_attention(q, k, v, bias, valid_start, alpha=alpha, inv_n=inv_n)
    try:
        from streamtrain.ops.triton.triton_hstu_attention import triton_hstu_attention
    except ImportError as err:
        raise ImportError(
            "the Triton HSTU kernel needs `triton` (pip install 'streamtrain[triton]'); "
            "or set model.hstu.kernel=pytorch"
        ) from err
    return triton_hstu_attention(q, k, v, bias, valid_start, alpha=alpha, inv_n=inv_n)


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    valid_start: torch.Tensor,
    *,
    alpha: float,
) -> torch.Tensor:
    """The softmax ablation of HSTU attention; same shapes. Only a PyTorch backend exists
    (``HSTUConfig`` rejects ``attention=softmax`` with ``kernel=triton``)."""
    _check_shapes(q, k, v, bias, valid_start)
    return pytorch_softmax_attention(q, k, v, bias, valid_start, alpha=alpha)
