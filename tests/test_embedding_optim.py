"""Row-wise optimizers against torch.optim on a dense nn.Embedding equivalent."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
from torch import nn

from streamtrain.embedding import EmbeddingTableConfig
from streamtrain.modules.dynamic_embedding import DynamicEmbedding

DIM, STEPS = 8, 12
KEYS = torch.tensor([3, 17, 1 << 40, 99991, 123456789012, 5], dtype=torch.int64)  # arbitrary int64 ids


def loss_fn(out: torch.Tensor) -> torch.Tensor:
    # Non-linear in the rows, so a wrong update also changes later gradients.
    target = torch.linspace(-1, 1, out.shape[-1])
    return ((out - target) ** 2).sum() + out.sum(-1).tanh().sum()


def admitted(optimizer: dict[str, Any]) -> tuple[DynamicEmbedding, nn.Embedding]:
    """A table holding KEYS and a dense embedding whose row i starts equal to KEYS[i]'s row."""
    cfg = EmbeddingTableConfig(
        dim=DIM,
        initial_rows=16,
        max_rows=16,
        admission={"min_count": 1},
        eviction={"policy": "none"},
        optimizer=optimizer,
    )
    module = DynamicEmbedding(cfg)
    module(KEYS)
    module.apply_gradients()  # admits without a gradient: no update
    module.eval()
    dense = nn.Embedding(len(KEYS), DIM)
    with torch.no_grad():
        dense.weight.copy_(module(KEYS))
    module.train()
    return module, dense


def batches(every_row_every_step: bool) -> list[torch.Tensor]:
    """Index batches into KEYS with duplicates; some rows skip some steps unless told otherwise."""
    gen = torch.Generator().manual_seed(7)
    out = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(KEYS) - 2, (2, 3), generator=gen)  # rows 0-3 skip ~1 step in 5
        if every_row_every_step:
            idx = torch.cat([idx.view(-1), torch.arange(len(KEYS))]).view(2, -1)
        out.append(idx)
    return out


def run_both(optimizer: dict[str, Any], make_torch: Callable[[list[nn.Parameter]], torch.optim.Optimizer], every_row: bool) -> None:
    module, dense = admitted(optimizer)
    opt = make_torch([dense.weight])
    for idx in batches(every_row):
        loss_fn(module(KEYS[idx])).backward()
        module.apply_gradients()
        opt.zero_grad()
        loss_fn(dense(idx)).backward()
        opt.step()
        module.eval()
        torch.testing.assert_close(module(KEYS), dense.weight.detach(), rtol=1e-5, atol=1e-6)
        module.train()


@pytest.mark.parametrize("every_row", [False, True])
def test_sgd_matches_torch(every_row: bool) -> None:
    run_both({"kind": "sgd", "lr": 0.05}, lambda p: torch.optim.SGD(p, lr=0.05), every_row)


@pytest.mark.parametrize("every_row", [False, True])
def test_adagrad_matches_torch(every_row: bool) -> None:
    run_both(
        {"kind": "adagrad", "lr": 0.1, "eps": 1e-10, "initial_accumulator_value": 0.1},
        lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10, initial_accumulator_value=0.1),
        every_row,
    )


def test_adam_matches_dense_torch_adam_when_every_row_trains_every_step() -> None:
    run_both(
        {"kind": "adam", "lr": 0.01, "eps": 1e-8, "beta1": 0.8, "beta2": 0.99},
        lambda p: torch.optim.Adam(p, lr=0.01, eps=1e-8, betas=(0.8, 0.99)),
        every_row=True,
    )


def test_adam_is_per_row_lazy_adam() -> None:
    """Reference: one torch Adam per row, stepped only on steps that row has a gradient."""
    module, dense = admitted({"kind": "adam", "lr": 0.01, "eps": 1e-8})
    params = [nn.Parameter(dense.weight[i].detach().clone()) for i in range(len(KEYS))]
    opts = [torch.optim.Adam([p], lr=0.01, eps=1e-8) for p in params]
    for idx in batches(every_row_every_step=False):
        loss_fn(module(KEYS[idx])).backward()
        module.apply_gradients()
        loss_fn(torch.stack(list(params))[idx]).backward()
        for i in torch.unique(idx).tolist():
            opts[i].step()
        for p in params:
            p.grad = None
    module.eval()
    torch.testing.assert_close(module(KEYS), torch.stack(list(params)).detach(), rtol=1e-5, atol=1e-6)
    untouched = module(KEYS[-2:])
    torch.testing.assert_close(untouched, dense.weight[-2:].detach(), rtol=0, atol=0)


def test_gradients_of_several_lookups_in_one_step_are_summed_per_row() -> None:
    module, dense = admitted({"kind": "adagrad", "lr": 0.1})
    opt = torch.optim.Adagrad([dense.weight], lr=0.1)
    a, b = torch.tensor([0, 1, 1, 2]), torch.tensor([[1, 3], [3, 0]])
    (loss_fn(module(KEYS[a])) + loss_fn(module(KEYS[b]))).backward()
    module.apply_gradients()
    (loss_fn(dense(a)) + loss_fn(dense(b))).backward()
    opt.step()
    module.eval()
    torch.testing.assert_close(module(KEYS), dense.weight.detach(), rtol=1e-5, atol=1e-6)


def test_lr_passed_to_apply_gradients_overrides_the_config() -> None:
    module, dense = admitted({"kind": "sgd", "lr": 1.0})
    opt = torch.optim.SGD([dense.weight], lr=0.003)
    idx = torch.tensor([0, 2, 2])
    loss_fn(module(KEYS[idx])).backward()
    module.apply_gradients(lr=0.003)
    loss_fn(dense(idx)).backward()
    opt.step()
    module.eval()
    torch.testing.assert_close(module(KEYS), dense.weight.detach(), rtol=1e-5, atol=1e-6)
