"""Admission: a count-min sketch of key occurrences in bounded memory.

A key earns a trained row once its estimated count reaches ``min_count``. The sketch
over-estimates (collisions only add), never under-estimates, so a key is never kept out
longer than ``min_count`` sightings; the error bound is e * N / width per row with
probability 1 - e^-depth, N the occurrences counted since the last halving.
"""

from __future__ import annotations

from typing import Final

import torch

from streamtrain.embedding.hashing import mix64

_SATURATION: Final = 1 << 30  # counts stay far below int32 max even after a batch is added
_SALT: Final = 0x5CE7C4  # separates sketch hashes from hash-map slots and row init


class CountMinSketch:
    """``depth x width`` int32 counters; ``width`` a power of two."""

    def __init__(self, width: int, depth: int, device: torch.device | str = "cpu") -> None:
        if width & (width - 1):
            raise ValueError(f"width must be a power of two, got {width}")
        self.counts = torch.zeros(depth, width, dtype=torch.int32, device=device)  # (depth, width)
        self._row_salts = mix64(torch.arange(depth, dtype=torch.int64, device=device) + _SALT)  # (depth,)
        self._row_offsets = torch.arange(depth, dtype=torch.int64, device=device) * width  # (depth,)

    @property
    def nbytes(self) -> int:
        return self.counts.nbytes

    def _cells(self, keys: torch.Tensor) -> torch.Tensor:
        """keys: (N,) -> flat counter index (depth, N)."""
        width = self.counts.shape[1]
        return (mix64(keys[None, :] ^ self._row_salts[:, None]) & (width - 1)) + self._row_offsets[:, None]

    def add(self, keys: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Count ``counts[i]`` more sightings of ``keys[i]`` (keys unique); return the new estimates (N,)."""
        cells = self._cells(keys).reshape(-1)  # (depth * N,)
        flat = self.counts.view(-1)
        flat.index_add_(0, cells, counts.to(torch.int32).expand(self.counts.shape[0], -1).reshape(-1))
        # Saturate only the touched cells (a full clamp would cost O(width) per step). Colliding
        # cells are written several times with the same value, so the result is deterministic.
        touched = flat.index_select(0, cells).clamp_max_(_SATURATION)
        flat.index_copy_(0, cells, touched)
        return touched.view(self.counts.shape[0], -1).amin(0)

    def estimate(self, keys: torch.Tensor) -> torch.Tensor:
        """keys: (N,) -> estimated counts (N,) int32."""
        cells = self._cells(keys)  # (depth, N)
        return self.counts.view(-1).index_select(0, cells.reshape(-1)).view(cells.shape).amin(0)

    def halve(self) -> None:
        """Age every counter (the TinyLFU reset): old sightings count half."""
        self.counts.bitwise_right_shift_(1)
