"""Row-wise sparse optimizers: update only the rows a batch touched.

Each optimizer keeps *slots*: tensors whose first dim is the table's row count, so
row ``r``'s state lives at index ``r`` and moves, spills and checkpoints with the row.
``step`` receives unique rows with their already-coalesced gradients (duplicate ids in a
batch were summed by autograd), gathers the rows' state, updates it, and scatters back.

The arithmetic mirrors the single-tensor paths of ``torch.optim.SGD``, ``Adagrad`` and
``Adam`` so that a table equals a dense ``nn.Embedding`` trained with them:

* SGD and Adagrad: identical to the dense optimizers, because a zero gradient leaves a
  row (and its Adagrad sum) unchanged there too.
* Adam is *lazy and per-row*: a row's moments decay, and its step count (hence its bias
  correction) advances, only on steps where the row has a gradient. Dense
  ``torch.optim.Adam`` also moves untouched rows (momentum with a zero gradient) and
  counts steps globally; ``torch.optim.SparseAdam`` is lazy but counts steps globally.
  The two semantics coincide when every row is touched on every step, and per-row
  semantics equals one ``torch.optim.Adam`` per row stepped only when that row has a
  gradient -- the two references ``tests/test_embedding_optim.py`` checks against.
  Per-row counts keep a row that comes back from eviction (or is new) from receiving a
  bias correction computed for a step count it never saw.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
import torch.nn.functional as F

from streamtrain.embedding.config import RowOptimizerConfig


def gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t[rows]`` as a copy. For (R, D) tensors ``F.embedding`` is the fast gather on CPU
    (a parallel row memcpy; ``index_select`` on rows measured ~10x slower here)."""
    return F.embedding(rows, t) if t.dim() == 2 else t.index_select(0, rows)


class SlotSpec(NamedTuple):
    """Shape and initial value of one optimizer slot: (R, D) if per_element else (R,)."""

    per_element: bool
    dtype: torch.dtype
    fill: float


class RowOptimizer(ABC):
    """Row-wise update rule over a weight tensor (R, D) and its slots."""

    def __init__(self, config: RowOptimizerConfig) -> None:
        self.config = config

    @property
    @abstractmethod
    def slot_specs(self) -> dict[str, SlotSpec]:
        """Slot name -> spec; names are stable (they key checkpoints and spill records)."""

    def new_slots(self, num_rows: int, dim: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            name: torch.full((num_rows, dim) if spec.per_element else (num_rows,), spec.fill, dtype=spec.dtype, device=device)
            for name, spec in self.slot_specs.items()
        }

    def reset_rows(self, slots: dict[str, torch.Tensor], rows: torch.Tensor) -> None:
        """Fresh state for newly allocated rows (U,)."""
        for name, spec in self.slot_specs.items():
            slots[name].index_fill_(0, rows, spec.fill)

    @abstractmethod
    def step(self, weight: torch.Tensor, slots: dict[str, torch.Tensor], rows: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        """Update ``weight[rows]`` in place. rows: (U,) unique int64; grad: (U, D)."""


class RowSGD(RowOptimizer):
    @property
    def slot_specs(self) -> dict[str, SlotSpec]:
        return {}

    def step(self, weight: torch.Tensor, slots: dict[str, torch.Tensor], rows: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        weight.index_add_(0, rows, grad, alpha=-lr)  # rows are unique: a plain p -= lr * g


class RowAdagrad(RowOptimizer):
    @property
    def slot_specs(self) -> dict[str, SlotSpec]:
        return {"sum": SlotSpec(True, torch.float32, self.config.initial_accumulator_value)}

    def step(self, weight: torch.Tensor, slots: dict[str, torch.Tensor], rows: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        acc = gather_rows(slots["sum"], rows).addcmul_(grad, grad)  # (U, D)
        slots["sum"].index_copy_(0, rows, acc)
        std = acc.sqrt_().add_(self.config.eps)
        weight.index_copy_(0, rows, gather_rows(weight, rows).addcdiv_(grad, std, value=-lr))


class RowAdam(RowOptimizer):
    @property
    def slot_specs(self) -> dict[str, SlotSpec]:
        return {
            "exp_avg": SlotSpec(True, torch.float32, 0.0),
            "exp_avg_sq": SlotSpec(True, torch.float32, 0.0),
            "step": SlotSpec(False, torch.int64, 0),  # per-row count of updates (see module doc)
        }

    def step(self, weight: torch.Tensor, slots: dict[str, torch.Tensor], rows: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
        beta1, beta2 = self.config.beta1, self.config.beta2
        count = gather_rows(slots["step"], rows) + 1  # (U,)
        slots["step"].index_copy_(0, rows, count)
        m = gather_rows(slots["exp_avg"], rows).lerp_(grad, 1 - beta1)  # (U, D)
        v = gather_rows(slots["exp_avg_sq"], rows).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # (U, D)
        slots["exp_avg"].index_copy_(0, rows, m)
        slots["exp_avg_sq"].index_copy_(0, rows, v)
        # Bias corrections in float64 like torch's Python-float path, then per-row columns.
        t = count.to(torch.float64)
        step_size = (lr / (1 - torch.pow(beta1, t))).to(torch.float32)[:, None]  # (U, 1)
        bias2_sqrt = (1 - torch.pow(beta2, t)).sqrt_().to(torch.float32)[:, None]  # (U, 1)
        denom = v.sqrt_().div_(bias2_sqrt).add_(self.config.eps)
        weight.index_copy_(0, rows, gather_rows(weight, rows).sub_(m.div_(denom).mul_(step_size)))


def make_row_optimizer(config: RowOptimizerConfig) -> RowOptimizer:
    kinds: dict[str, type[RowOptimizer]] = {"sgd": RowSGD, "adagrad": RowAdagrad, "adam": RowAdam}
    return kinds[config.kind](config)
