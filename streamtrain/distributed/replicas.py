"""Data parallelism for the dense model: every rank steps on the same global batch and
runs a contiguous slice of its rows through the model.

One step, every rank::

    rows [lo, hi) of the global batch -> model forward      (embedding lookups exchange keys)
    all_gather of the slice's outputs -> the whole batch's outputs, on every rank
    model.loss(whole batch, whole outputs)                   (replicated: same bits everywhere)
    backward: the gradient of the replicated loss w.r.t. this rank's outputs is already
              known here, so the gather's backward just keeps this rank's rows
    all_reduce(SUM) of the dense gradients                   (each rank saw its rows only)

Why not ``DistributedDataParallel``: the loss couples rows (in-batch negatives of the
retrieval head, batch means whose denominator is the global batch), so it is computed
on gathered outputs and the dense gradients must be *summed*, not averaged; a rank whose
slice is empty (a last batch shorter than the world) must still take part, and the
model cannot run on zero rows (it crops to the batch's longest history). One flat
all-reduce after backward does all of that; DDP's overlap of communication with the
backward pass is worth little at this model's size (the dense part is a few MB).

Exactness: with one rank this is the plain step, bit for bit. With several, the
forward is row-wise (same math per row; float kernels may block differently by batch
shape), the loss is the single-process expression on the same rows in the same order,
and gradient sums associate differently: results agree within float32 rounding that
compounds over steps (measured in ``tests/test_scaleout.py``).

Precondition: the loss has no parameters of its own (every rank would count them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from streamtrain.distributed.comm import Comm
from streamtrain.modules.rec_model import RecModel


def row_slice(rows: int, rank: int, world: int) -> tuple[int, int]:
    """This rank's contiguous rows ``[lo, hi)`` of ``rows``; sizes differ by at most one."""
    base, extra = divmod(rows, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


class _GatherRows(torch.autograd.Function):
    """Concatenate every rank's rows (rank order). Backward keeps this rank's rows of the
    incoming gradient: valid because every rank computes the same loss from the result."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, comm: Comm, lo: int, hi: int) -> torch.Tensor:  # type: ignore[override]
        ctx.lo, ctx.hi = lo, hi
        return torch.cat(comm.all_gather_rows(local))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        return grad[ctx.lo:ctx.hi], None, None, None


def _padding_row(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One all-zero sample: every id is padding (looks nothing up), no history."""
    return {k: v.new_zeros((1, *v.shape[1:])) for k, v in batch.items()}


class RowReplicas:
    """:class:`~streamtrain.trainer.Replicas` over a :class:`Comm`."""

    def __init__(self, comm: Comm) -> None:
        self.comm = comm

    def forward(self, model: RecModel, batch: Mapping[str, torch.Tensor]
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        rows = batch["sample_id"].shape[0]
        lo, hi = row_slice(rows, self.comm.rank, self.comm.world)
        local = {k: v[lo:hi] for k, v in batch.items()} if hi > lo else _padding_row(batch)
        outputs = model(local)
        whole = self._gather({k: v[: hi - lo] for k, v in outputs.items()}, lo, hi)
        total, parts = model.loss(batch, whole)
        return whole, total, parts

    def _gather(self, outputs: Mapping[str, torch.Tensor], lo: int, hi: int) -> dict[str, torch.Tensor]:
        """Every rank's rows of every output, as one all_gather of a packed (rows, F) tensor."""
        names = sorted(outputs)
        shapes = [outputs[k].shape[1:] for k in names]
        dtypes = [outputs[k].dtype for k in names]
        widths = [torch.Size(s).numel() for s in shapes]
        packed = torch.cat([outputs[k].reshape(hi - lo, w).float() for k, w in zip(names, widths)], dim=1)  # (n, F)
        whole = _GatherRows.apply(packed, self.comm, lo, hi)  # (B, F)
        out = {}
        for name, part, shape, dtype in zip(names, whole.split(widths, dim=1), shapes, dtypes):
            # Contiguous, like the model's own outputs: reductions over strided views may
            # accumulate in another order, and the loss must be the single-process bits.
            out[name] = part.reshape(whole.shape[0], *shape).to(dtype).contiguous()
        return out

    def reduce_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Sum the dense gradients over ranks (one flat all-reduce). A parameter that got no
        gradient on any rank keeps ``None`` (Adam skips it, as in one process)."""
        params = list(parameters)
        if self.comm.alone:
            return
        has = self.comm.all_max([int(p.grad is not None) for p in params])
        live = [p for p, h in zip(params, has) if h]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in live])
        self.comm.all_reduce(flat)
        offset = 0
        for p in live:
            p.grad = flat[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
