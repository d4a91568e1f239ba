"""Triton kernel for pointwise HSTU attention: forward and backward.

Same contract as ``ops/pytorch/pt_hstu_attention.py`` (shapes, mask, ``inv_n``):
``O = (SiLU(Q Kᵀ α + rab) ⊙ M / n) V`` with ``M[b, i, j] = valid_start[b] <= j <= i``.

Layout: configs → kernels → ``autograd.Function`` → public function.

* Forward: one program per (query block, batch·head); it walks key blocks from the row's
  first real position up to the diagonal only, so left padding and the upper triangle
  cost nothing. No softmax means no running max / rescaling.
* Backward, two kernels, no atomics (deterministic):
  ``_bwd_dkdv`` — one program per key block, walks query blocks from the diagonal down;
  ``_bwd_dqdbias`` — one program per query block, same walk as the forward; it also
  writes ``dbias = dS`` (each (i, j) tile is owned by exactly one program).
  Both recompute ``S`` rather than store the (B, H, N, N) attention matrix.

Tiles are loaded as fp32 whatever the input dtype. fp32 inputs use IEEE dot products so
the kernel matches the fp32 reference (TF32 would not); fp16/bf16 inputs use TF32, which
is no coarser than the inputs themselves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------- configs


def _block_size(n: int) -> int:
    """One square tile size: 64 on real sequences, down to 16 (tl.dot's minimum) for tiny ones."""
    return max(16, min(64, triton.next_power_of_2(n)))


def _dim_block(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


# ---------------------------------------------------------------------------- kernels


@triton.jit
def _silu_parts(s):
    """SiLU(s) and its derivative σ(s)(1 + s(1 - σ(s)))."""
    sig = tl.sigmoid(s)
    return s * sig, sig * (1.0 + s * (1.0 - sig))


@triton.jit
def _fwd(
    Q, K, V, Bias, Start, Out,
    s_qb, s_qn, s_qh, s_vb, s_vn, s_vh, s_bb, s_bh, s_bi,
    N, H, alpha, inv_n,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start = tl.load(Start + b).to(tl.int32)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_qk = tl.arange(0, BLOCK_DQK)
    offs_v = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N

    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_qk[None, :],
        mask=row_ok[:, None] & (offs_qk[None, :] < DQK), other=0.0,
    ).to(tl.float32)  # (BLOCK, BLOCK_DQK)
    acc = tl.zeros((BLOCK, BLOCK_DV), dtype=tl.float32)
    lo = (start // BLOCK) * BLOCK
    hi = tl.minimum((pid_m + 1) * BLOCK, N)
    for n0 in range(lo, hi, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        col_ok = offs_n < N
        k = tl.load(
            K + b * s_qb + h * s_qh + offs_n[:, None] * s_qn + offs_qk[None, :],
            mask=col_ok[:, None] & (offs_qk[None, :] < DQK), other=0.0,
        ).to(tl.float32)  # (BLOCK, BLOCK_DQK)
        v = tl.load(
            V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_v[None, :],
            mask=col_ok[:, None] & (offs_v[None, :] < DV), other=0.0,
        ).to(tl.float32)  # (BLOCK, BLOCK_DV)
        bias = tl.load(
            Bias + b * s_bb + h * s_bh + offs_m[:, None] * s_bi + offs_n[None, :],
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        ).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        s = s * alpha + bias  # (BLOCK, BLOCK)
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= start) & row_ok[:, None]
        act, _ = _silu_parts(s)
        w = tl.where(visible, act * inv_n, 0.0)
        acc += tl.dot(w, v, input_precision=PRECISION)
    tl.store(
        Out + b * s_vb + h * s_vh + offs_m[:, None] * s_vn + offs_v[None, :],
        acc.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & (offs_v[None, :] < DV),
    )


@triton.jit
def _bwd_dkdv(
    Q, K, V, Bias, Start, DO, DK, DV_,
    s_qb, s_qn, s_qh, s_vb, s_vn, s_vh, s_bb, s_bh, s_bi,
    N, H, alpha, inv_n,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dV = Wᵀ dO and dK = α dSᵀ Q for one key block."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start = tl.load(Start + b).to(tl.int32)
    offs_n = pid_n * BLOCK + tl.arange(0, BLOCK)
    offs_qk = tl.arange(0, BLOCK_DQK)
    offs_v = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < N

    k = tl.load(
        K + b * s_qb + h * s_qh + offs_n[:, None] * s_qn + offs_qk[None, :],
        mask=col_ok[:, None] & (offs_qk[None, :] < DQK), other=0.0,
    ).to(tl.float32)  # (BLOCK, BLOCK_DQK)
    v = tl.load(
        V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_v[None, :],
        mask=col_ok[:, None] & (offs_v[None, :] < DV), other=0.0,
    ).to(tl.float32)  # (BLOCK, BLOCK_DV)
    dk = tl.zeros((BLOCK, BLOCK_DQK), dtype=tl.float32)
    dv = tl.zeros((BLOCK, BLOCK_DV), dtype=tl.float32)
    # Queries before the diagonal or before the row's first real position see none of these keys.
    lo = (tl.maximum(pid_n * BLOCK, start) // BLOCK) * BLOCK
    for m0 in range(lo, N, BLOCK):
        offs_m = m0 + tl.arange(0, BLOCK)
        row_ok = offs_m < N
        q = tl.load(
            Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_qk[None, :],
            mask=row_ok[:, None] & (offs_qk[None, :] < DQK), other=0.0,
        ).to(tl.float32)  # (BLOCK, BLOCK_DQK)
        do = tl.load(
            DO + b * s_vb + h * s_vh + offs_m[:, None] * s_vn + offs_v[None, :],
            mask=row_ok[:, None] & (offs_v[None, :] < DV), other=0.0,
        ).to(tl.float32)  # (BLOCK, BLOCK_DV)
        bias = tl.load(
            Bias + b * s_bb + h * s_bh + offs_m[:, None] * s_bi + offs_n[None, :],
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        ).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * alpha + bias
        dw = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= start) & row_ok[:, None]
        act, dact = _silu_parts(s)
        w = tl.where(visible, act * inv_n, 0.0)  # (BLOCK_M, BLOCK_N)
        ds = tl.where(visible, dw * dact * inv_n, 0.0)
        dv += tl.dot(tl.trans(w), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds), q, input_precision=PRECISION)
    tl.store(
        DK + b * s_qb + h * s_qh + offs_n[:, None] * s_qn + offs_qk[None, :],
        (dk * alpha).to(DK.dtype.element_ty),
        mask=col_ok[:, None] & (offs_qk[None, :] < DQK),
    )
    tl.store(
        DV_ + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_v[None, :],
        dv.to(DV_.dtype.element_ty),
        mask=col_ok[:, None] & (offs_v[None, :] < DV),
    )


@triton.jit
def _bwd_dqdbias(
    Q, K, V, Bias, Start, DO, DQ, DBias,
    s_qb, s_qn, s_qh, s_vb, s_vn, s_vh, s_bb, s_bh, s_bi,
    N, H, alpha, inv_n,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ = α dS K and dBias = dS for one query block; DBias shares the bias strides and
    must be zero-initialised (tiles this walk skips are fully masked)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    start = tl.load(Start + b).to(tl.int32)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_qk = tl.arange(0, BLOCK_DQK)
    offs_v = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < N

    q = tl.load(
        Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_qk[None, :],
        mask=row_ok[:, None] & (offs_qk[None, :] < DQK), other=0.0,
    ).to(tl.float32)  # (BLOCK, BLOCK_DQK)
    do = tl.load(
        DO + b * s_vb + h * s_vh + offs_m[:, None] * s_vn + offs_v[None, :],
        mask=row_ok[:, None] & (offs_v[None, :] < DV), other=0.0,
    ).to(tl.float32)  # (BLOCK, BLOCK_DV)
    dq = tl.zeros((BLOCK, BLOCK_DQK), dtype=tl.float32)
    lo = (start // BLOCK) * BLOCK
    hi = tl.minimum((pid_m + 1) * BLOCK, N)
    for n0 in range(lo, hi, BLOCK):
        offs_n = n0 + tl.arange(0, BLOCK)
        col_ok = offs_n < N
        k = tl.load(
            K + b * s_qb + h * s_qh + offs_n[:, None] * s_qn + offs_qk[None, :],
            mask=col_ok[:, None] & (offs_qk[None, :] < DQK), other=0.0,
        ).to(tl.float32)
        v = tl.load(
            V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_v[None, :],
            mask=col_ok[:, None] & (offs_v[None, :] < DV), other=0.0,
        ).to(tl.float32)
        tile = b * s_bb + h * s_bh + offs_m[:, None] * s_bi + offs_n[None, :]
        tile_ok = row_ok[:, None] & col_ok[None, :]
        bias = tl.load(Bias + tile, mask=tile_ok, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * alpha + bias
        dw = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        visible = (offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] >= start) & row_ok[:, None]
        _, dact = _silu_parts(s)
        ds = tl.where(visible, dw * dact * inv_n, 0.0)  # (BLOCK_M, BLOCK_N)
        tl.store(DBias + tile, ds.to(DBias.dtype.element_ty), mask=tile_ok)
        dq += tl.dot(ds, k, input_precision=PRECISION)
    tl.store(
        DQ + b * s_qb + h * s_qh + offs_m[:, None] * s_qn + offs_qk[None, :],
        (dq * alpha).to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & (offs_qk[None, :] < DQK),
    )


# ---------------------------------------------------------------------------- autograd


def _launch(kernel, tensors: tuple[torch.Tensor, ...], q: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
            alpha: float, inv_n: float) -> None:
    """Launch one of the three kernels over (blocks of N, B·H). Operands are contiguous:
    Q/K/dQ/dK share q's strides, V/O/dO/dV share v's, bias/dbias share bias's."""
    b, n, h, dqk = q.shape
    dv = v.shape[-1]
    block = _block_size(n)
    kernel[(triton.cdiv(n, block), b * h)](
        *tensors,
        q.stride(0), q.stride(1), q.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        bias.stride(0), bias.stride(1), bias.stride(2),
        n, h, alpha, inv_n,
        DQK=dqk, DV=dv, BLOCK_DQK=_dim_block(dqk), BLOCK_DV=_dim_block(dv),
        BLOCK=block, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


class _HSTUAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, valid_start, alpha: float, inv_n: float):  # type: ignore[override]
        q, k, v, bias = q.contiguous(), k.contiguous(), v.contiguous(), bias.contiguous()
        valid_start = valid_start.contiguous()
        out = torch.empty_like(v)
        _launch(_fwd, (q, k, v, bias, valid_start, out), q, v, bias, alpha, inv_n)
        ctx.save_for_backward(q, k, v, bias, valid_start)
        ctx.alpha, ctx.inv_n = alpha, inv_n
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v, bias, valid_start = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = torch.zeros_like(bias)  # tiles outside the mask are never visited
        _launch(_bwd_dkdv, (q, k, v, bias, valid_start, grad_out, dk, dv), q, v, bias, ctx.alpha, ctx.inv_n)
        _launch(_bwd_dqdbias, (q, k, v, bias, valid_start, grad_out, dq, dbias), q, v, bias, ctx.alpha, ctx.inv_n)
        return dq, dk, dv, dbias, None, None, None


# ---------------------------------------------------------------------------- public


def triton_hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    valid_start: torch.Tensor,
    *,
    alpha: float,
    inv_n: float,
) -> torch.Tensor:
    """Triton pointwise HSTU attention; same contract as ``pytorch_hstu_attention``.

    q, k: (B, N, H, Dqk); v: (B, N, H, Dv); bias: (B, H, N, N); valid_start: (B,) int64.
    Returns (B, N, H, Dv). Differentiable in q, k, v and bias.
    """
    return _HSTUAttention.apply(q, k, v, bias, valid_start, alpha, inv_n)
