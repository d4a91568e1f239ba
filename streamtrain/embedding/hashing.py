"""Stateless int64 hashing as tensor ops: the same bits on every device and in every run.

Everything that must be reproducible across restarts and devices (hash-map slots,
count-min rows, the initial value of a key's embedding) derives from :func:`mix64`.

Hazard: torch int64 arithmetic wraps on overflow (two's complement) and ``>>`` is an
arithmetic shift; splitmix64 needs a *logical* shift, so shifted values are masked.
``tests/test_embedding_hashmap.py`` pins the result against a pure-Python splitmix64.
"""

from __future__ import annotations

from typing import Final

import torch

_U64: Final = 1 << 64


def _signed(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    return c - _U64 if c >= 1 << 63 else c


_GOLDEN: Final = _signed(0x9E3779B97F4A7C15)
_M1: Final = _signed(0xBF58476D1CE4E5B9)
_M2: Final = _signed(0x94D049BB133111EB)


_INIT_CHUNK: Final = 1 << 12  # keys per pass in uniform_rows: (4K, 64) int64 = 2 MiB, stays in cache


def _xor_shift_right_(z: torch.Tensor, s: int) -> torch.Tensor:
    return z.bitwise_xor_((z >> s).bitwise_and_((1 << (64 - s)) - 1))


def _finalize_(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser, in place (one temporary at a time: big inputs stay cheap)."""
    _xor_shift_right_(z, 30).mul_(_M1)
    _xor_shift_right_(z, 27).mul_(_M2)
    return _xor_shift_right_(z, 31)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 of each element of an int64 tensor (any shape, any device)."""
    return _finalize_(x + _GOLDEN)


def uniform_rows(keys: torch.Tensor, dim: int, bound: float, salt: int) -> torch.Tensor:
    """Initial embedding rows, uniform in [-bound, bound), as a pure function of the key.

    keys: (N,) int64 -> (N, dim) float32. A key gets the same row whenever it is
    (re)admitted, in any order, on any device, which keeps replays bit-identical
    without carrying an RNG state in checkpoints.
    """
    per_key = mix64(keys ^ salt)  # (N,)
    lanes = torch.arange(dim, device=keys.device, dtype=torch.int64) * _GOLDEN  # (D,)
    out = torch.empty(keys.numel(), dim, device=keys.device)  # (N, D)
    for start in range(0, keys.numel(), _INIT_CHUNK):
        bits = _finalize_(per_key[start : start + _INIT_CHUNK, None] + lanes + _GOLDEN)  # (n, D)
        top24 = bits.bitwise_right_shift_(40).bitwise_and_(0xFFFFFF)  # exactly representable in float32
        out[start : start + _INIT_CHUNK] = top24.to(torch.float32).mul_(2 * bound / (1 << 24)).sub_(bound)
    return out
