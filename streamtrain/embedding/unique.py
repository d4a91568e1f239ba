"""``torch.unique(x, return_inverse=True, return_counts=True)`` for 1-D int64, faster on CPU.

On CPU torch's unique sorts with a slow path (and in deterministic mode, which the daemon
runs, slower still): for the ~11k item ids of a 256-row batch it measured 0.77 ms of CPU
against 0.31 ms for numpy's quicksort-based argsort and the same three results. Unique
values, inverse and counts do not depend on how equal keys are ordered by the sort, so
the two agree bit for bit (``tests/test_embedding_unique.py``). Small inputs and other
devices keep ``torch.unique``, which is faster there.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import torch

_NUMPY_FROM: Final = 4096  # elements; below this torch.unique's lower fixed cost wins (measured)


def unique_inverse_counts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N,) int64 -> (sorted unique values (U,), inverse (N,), counts (U,)), as torch.unique."""
    if x.device.type != "cpu" or x.numel() < _NUMPY_FROM:
        return torch.unique(x, return_inverse=True, return_counts=True)
    a = x.numpy()
    order = np.argsort(a)  # unstable: ties may land in any order, the results cannot tell
    ordered = a[order]
    starts = np.empty(len(a), dtype=bool)  # (N,) first element of each run of equal values
    starts[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    first = np.flatnonzero(starts)  # (U,)
    inverse = np.empty(len(a), dtype=np.int64)
    inverse[order] = np.cumsum(starts) - 1
    counts = np.diff(first, append=len(a))
    return torch.from_numpy(ordered[first]), torch.from_numpy(inverse), torch.from_numpy(counts)
