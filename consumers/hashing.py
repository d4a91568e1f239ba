"""Fast, stable hashing helpers on top of :func:`consumers.schema.hash_id`.

``hash_id`` (blake2b) costs ~0.5 µs a call, so hot paths memoise it for values that
repeat (user, item, feature values). The integer mixers are the counter-based RNG of the
joiner: a pure function of their inputs, vectorised over numpy arrays, identical on every
replay no matter how samples were batched.
"""

from __future__ import annotations

import numpy as np

from consumers.schema import hash_id

_MASK63 = np.uint64((1 << 63) - 1)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 (wrapping arithmetic), elementwise."""
    z = x.astype(np.uint64, copy=True)
    z += _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def mix_ids(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Combine two int64 ids into one positive, non-zero int64 (e.g. request x item)."""
    h = splitmix64(splitmix64(a.astype(np.int64).view(np.uint64)) ^ b.astype(np.int64).view(np.uint64))
    out = (h & _MASK63).astype(np.int64)
    out[out == 0] = 1
    return out


class HashMemo:
    """Bounded memo of ``hash_id`` for user/item ids: cleared wholesale when full, which
    keeps it O(1) per lookup and never changes a result (hashes are pure). Hot loops read
    ``ids`` directly and call :meth:`id` on a miss."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        self._capacity = capacity
        self.ids: dict[str | int, int] = {}

    def id(self, value: str | int) -> int:
        h = self.ids.get(value)
        if h is None:
            if len(self.ids) >= self._capacity:
                self.ids.clear()
            h = self.ids[value] = hash_id(value)
        return h
