"""The CPU unique of table lookups equals ``torch.unique`` bit for bit, on both of its paths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtrain.embedding.unique import _NUMPY_FROM, unique_inverse_counts


def _check(x: torch.Tensor) -> None:
    got = unique_inverse_counts(x)
    want = torch.unique(x, return_inverse=True, return_counts=True)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("n", [1, _NUMPY_FROM - 1, _NUMPY_FROM, 3 * _NUMPY_FROM + 7])
@pytest.mark.parametrize("distinct", [1, 50, 100_000])
def test_equals_torch_unique_on_both_paths(n: int, distinct: int) -> None:
    gen = torch.Generator().manual_seed(n * 31 + distinct)
    pool = torch.randint(-(1 << 63), (1 << 63) - 1, (distinct,), generator=gen)
    _check(pool[torch.randint(0, distinct, (n,), generator=gen)])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(1 << 63), (1 << 63) - 1), min_size=1, max_size=50), st.integers(0, 2 * _NUMPY_FROM))
def test_equals_torch_unique_with_extreme_values(values: list[int], repeat_to: int) -> None:
    x = torch.tensor(values, dtype=torch.int64).repeat(max(1, repeat_to // len(values)))  # big ones take numpy's path
    _check(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(repeat_to))])


def test_empty_input() -> None:
    _check(torch.empty(0, dtype=torch.int64))
