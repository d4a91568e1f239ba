"""Map int64 ids (users, items) to dense row numbers, with least-recently-seen eviction.

Owners keep per-id data in numpy arrays indexed by the row ("slot") this index hands
out, and grow them to :attr:`IdIndex.allocated`. Eviction runs only when the owner calls
:meth:`evict_over_capacity` — the joiner does so at event-time refresh boundaries, so what
is evicted depends on event time only, never on how input was batched. The capacity is
therefore soft: it can be exceeded by the ids first seen within one refresh interval.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FORMAT_VERSION = 1


class IdIndex:
    def __init__(self, capacity: int, initial: int = 1024) -> None:
        self.capacity = capacity
        self._slot_of: dict[int, int] = {}
        self.keys = np.zeros(initial, np.int64)  # slot -> id, 0 = free
        self.last_seen = np.zeros(initial, np.int64)  # slot -> latest event ts
        self._free: list[int] = list(range(initial - 1, -1, -1))  # popped from the end: lowest slot first

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def allocated(self) -> int:
        return len(self.keys)

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` (any shape); -1 where unknown."""
        get = self._slot_of.get
        flat = ids.reshape(-1)
        uniq, inverse = np.unique(flat, return_inverse=True)
        slots = np.array([get(k, -1) for k in uniq.tolist()], np.int64)
        return slots[inverse].reshape(ids.shape)

    def insert(self, ids: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` (1-D), allocating new ones in order of first appearance;
        ``last_seen`` becomes the max of itself and ``ts``."""
        uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
        by_appearance = np.argsort(first, kind="stable")
        slots = np.empty(len(uniq), np.int64)
        slot_of = self._slot_of
        for u, key in zip(by_appearance.tolist(), uniq[by_appearance].tolist()):
            slot = slot_of.get(key)
            if slot is None:
                if not self._free:
                    self._grow()
                slot = slot_of[key] = self._free.pop()
                self.keys[slot] = key
            slots[u] = slot
        out = slots[inverse]
        np.maximum.at(self.last_seen, out, ts)
        return out

    def _grow(self) -> None:
        old = len(self.keys)
        self.keys = np.concatenate([self.keys, np.zeros(old, np.int64)])
        self.last_seen = np.concatenate([self.last_seen, np.zeros(old, np.int64)])
        self._free = list(range(2 * old - 1, old - 1, -1))

    def evict_over_capacity(self) -> np.ndarray:
        """Free the least recently seen ids (ties: smaller id first) until 7/8 of the
        capacity is used; return the freed slots so the owner can clear its rows."""
        excess = len(self._slot_of) - self.capacity
        if excess <= 0:
            return np.zeros(0, np.int64)
        used = np.flatnonzero(self.keys)
        target = len(used) - (self.capacity * 7) // 8
        order = np.lexsort((self.keys[used], self.last_seen[used]))
        freed = np.sort(used[order[:target]])
        for key in self.keys[freed].tolist():
            del self._slot_of[key]
        self.keys[freed] = 0
        self.last_seen[freed] = 0
        self._free = sorted(set(self._free) | set(freed.tolist()), reverse=True)
        return freed

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "keys": self.keys.copy(), "last_seen": self.last_seen.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"id index state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        self.keys = np.array(state["keys"], np.int64)
        self.last_seen = np.array(state["last_seen"], np.int64)
        used = np.flatnonzero(self.keys)
        self._slot_of = dict(zip(self.keys[used].tolist(), used.tolist()))
        if len(self._slot_of) != len(used):
            raise ValueError("id index state has duplicate ids")
        self._free = np.flatnonzero(self.keys == 0)[::-1].tolist()
