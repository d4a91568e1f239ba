"""A vectorised open-addressing hash map: int64 key -> int64 value, as tensor ops.

Linear probing over a power-of-two slot array. Every operation works on a whole batch
of keys: each *round* gathers a window of consecutive slots (:data:`PROBE_WINDOW` for
inserts; growing 4x per round for lookups) for all still-unresolved keys at once, so the
Python loop runs once per round, never per key.

Slot states: ``EMPTY`` (0, which is also the reserved padding id, so it is never a
real key), ``TOMBSTONE`` (int64 min, a removed key), or a live key. Invariant: a live
key sits before the first ``EMPTY`` slot of its probe sequence. Inserts claim only
``EMPTY`` slots and removals leave tombstones, so the invariant survives both;
tombstones count towards the load factor and are dropped by the next rehash.

Bounded probing: an insert gives up on a key whose probe window would start past
:data:`MAX_PROBE_DISTANCE` and rehashes into twice the slots; lookups never probe past
the largest distance any live key was placed at, so both are bounded.

Concurrent claims: when several keys of one batch find the same first empty slot, the
one with the smallest position in the batch wins (``scatter_reduce`` amin); the others
probe on. Callers pass sorted unique keys, so the layout is a pure function of the
insertion history on every device.
"""

from __future__ import annotations

import math
from typing import Final

import torch

from streamtrain.embedding.hashing import mix64

EMPTY: Final = 0
TOMBSTONE: Final = -(1 << 63)
PROBE_WINDOW: Final = 4  # slots per insert round and first lookup round (measured best of 2-16 at load 0.5)
MAX_PROBE_DISTANCE: Final = 256  # past this, the table is too clustered: rehash bigger
_CHUNK: Final = 1 << 20  # keys per probe pass; bounds the (P, PROBE_WINDOW) temporaries


class TensorHashMap:
    """``int64 key -> int64 value`` on one device; missing keys read as ``-1``.

    Keys must be neither ``EMPTY`` (0) nor ``TOMBSTONE`` (int64 min); values are >= 0.
    """

    def __init__(self, expected_entries: int, max_load: float, device: torch.device | str = "cpu") -> None:
        if not 0.0 < max_load < 1.0:
            raise ValueError(f"max_load must be in (0, 1), got {max_load}")
        self.max_load = max_load
        self.device = torch.device(device)
        self._window = torch.arange(PROBE_WINDOW, device=self.device)  # (W,)
        self._allocate(self._capacity_for(expected_entries))

    # ------------------------------------------------------------------ properties
    @property
    def capacity(self) -> int:
        return self._keys.numel()

    @property
    def size(self) -> int:
        """Live keys."""
        return self._size

    @property
    def load_factor(self) -> float:
        """Occupied slots (live + tombstones) over capacity; a rehash keeps it <= max_load."""
        return (self._size + self._tombstones) / self.capacity

    @property
    def max_probe_distance(self) -> int:
        return self._max_probe

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._values.nbytes

    # ------------------------------------------------------------------ operations
    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """keys: (N,) int64 -> values (N,) int64, ``-1`` where absent."""
        slots = self._find(keys)
        return torch.where(slots >= 0, self._values.index_select(0, slots.clamp_min(0)), -1)

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Insert keys that are unique and absent. keys, values: (N,) int64.

        Raises ``ValueError`` if a key is already present (a caller bug: the map would
        otherwise hold two slots for one key).
        """
        if keys.numel() == 0:
            return
        if self._size + self._tombstones + keys.numel() > self.max_load * self.capacity:
            self._rehash(max(self.capacity, self._capacity_for(self._size + keys.numel())))
        failed = self._place(keys, values)
        while failed.numel():
            self._rehash(self.capacity * 2)
            keys, values = keys[failed], values[failed]
            failed = self._place(keys, values)

    def remove(self, keys: torch.Tensor) -> torch.Tensor:
        """Remove keys; returns their values (N,), ``-1`` for keys that were absent."""
        slots = self._find(keys)
        found = slots[slots >= 0]
        removed = torch.where(slots >= 0, self._values.index_select(0, slots.clamp_min(0)), -1)
        self._keys[found] = TOMBSTONE
        self._values[found] = -1
        self._size -= found.numel()
        self._tombstones += found.numel()
        return removed

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Live (keys, values), in slot order."""
        live = (self._keys != EMPTY) & (self._keys != TOMBSTONE)
        return self._keys[live], self._values[live]

    # ------------------------------------------------------------------ internals
    def _capacity_for(self, entries: int) -> int:
        need = max(PROBE_WINDOW, math.ceil(max(entries, 1) / self.max_load))
        return 1 << (need - 1).bit_length()

    def _allocate(self, capacity: int) -> None:
        self._keys = torch.zeros(capacity, dtype=torch.int64, device=self.device)  # (C,) EMPTY
        self._values = torch.full((capacity,), -1, dtype=torch.int64, device=self.device)  # (C,)
        self._mask = capacity - 1
        self._size = 0
        self._tombstones = 0
        self._max_probe = 0

    def _rehash(self, capacity: int) -> None:
        keys, values = self.items()
        while True:
            self._allocate(capacity)
            if self._place(keys, values).numel() == 0:
                return
            capacity *= 2

    def _home(self, keys: torch.Tensor) -> torch.Tensor:
        return mix64(keys) & self._mask

    def _find(self, keys: torch.Tensor) -> torch.Tensor:
        """keys: (N,) -> slot (N,) holding each key, ``-1`` where absent.

        Windows grow 4x per round (4, 16, 64, ... slots): nearly every key resolves in
        the first, and the rare long chain costs one or two more rounds, not one per window.
        The first round runs over all keys without bookkeeping, and when no key was ever
        placed past it (the usual case at the default load) it is the only one.
        """
        home = self._home(keys)  # (N,)
        result, unresolved = self._probe(keys, home, self._window)
        start, width = PROBE_WINDOW, PROBE_WINDOW * 4
        if start > self._max_probe:
            return result
        pending = unresolved.nonzero().squeeze(1)  # (P,) positions in keys
        while start <= self._max_probe and pending.numel():
            window = torch.arange(start, start + width, device=self.device)  # (W,)
            at, unresolved = self._probe(keys.index_select(0, pending), home.index_select(0, pending), window)
            result.index_copy_(0, pending, at)
            pending = pending.index_select(0, unresolved.nonzero().squeeze(1))
            start, width = start + width, width * 4
        return result

    def _probe(self, want: torch.Tensor, home: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One probe window (W,) of offsets from each key's home slot: ``(slot (P,), -1 where
        not in this window; unresolved (P,) bool, the keys whose sequence goes on past it)``."""
        slots = (home[:, None] + window) & self._mask  # (P, W)
        seen = _gather(self._keys, slots)  # (P, W)
        hit = seen == want[:, None]  # (P, W), one True per row at most (or repeats of one slot)
        at = torch.where(hit.any(1), slots.gather(1, hit.byte().argmax(1, keepdim=True)).squeeze(1), -1)  # (P,)
        # An EMPTY slot ends the probe sequence: the key is absent.
        return at, ~(hit | (seen == EMPTY)).any(1)

    def _place(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Probe-insert in chunks; returns positions (into keys) that passed MAX_PROBE_DISTANCE."""
        failed = [self._place_chunk(keys[s : s + _CHUNK], values[s : s + _CHUNK]) + s for s in range(0, keys.numel(), _CHUNK)]
        return torch.cat(failed) if failed else keys.new_empty(0)

    def _place_chunk(self, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        pending = torch.arange(keys.numel(), device=self.device)  # (P,) positions in keys
        want, home = keys, self._home(keys)  # (P,)
        offset = torch.zeros_like(keys)  # (P,) probe distance of each window start
        failed: list[torch.Tensor] = []
        # Each round a pending key either claims a slot, loses a claim (and sees that slot
        # taken next round) or advances a full window, so its offset grows at least every
        # two rounds: the loop ends within 2 * MAX_PROBE_DISTANCE rounds.
        while pending.numel():
            slots = (home[:, None] + offset[:, None] + self._window) & self._mask  # (P, W)
            seen = _gather(self._keys, slots)  # (P, W)
            if bool((seen == want[:, None]).any()):
                raise ValueError("insert of a key that is already present")
            empty = seen == EMPTY  # (P, W)
            has_empty = empty.any(1)  # (P,)
            first = empty.byte().argmax(1)  # (P,) first empty position (0 if none)
            target = slots.gather(1, first[:, None]).squeeze(1)  # (P,)
            claimants = has_empty.nonzero().squeeze(1)  # (Q,) indices into pending
            winners = claimants.index_select(0, self._elect(target.index_select(0, claimants), claimants))
            won_slots = target.index_select(0, winners)
            self._keys.index_copy_(0, won_slots, want.index_select(0, winners))
            self._values.index_copy_(0, won_slots, values.index_select(0, pending.index_select(0, winners)))
            self._size += winners.numel()
            if winners.numel():
                self._max_probe = max(self._max_probe, int((offset + first).index_select(0, winners).max()))
            offset = torch.where(has_empty, offset + first, offset + PROBE_WINDOW)
            going = torch.ones_like(has_empty)
            going[winners] = False
            too_far = going & (offset > MAX_PROBE_DISTANCE)
            failed.append(pending[too_far])
            keep = (going & ~too_far).nonzero().squeeze(1)
            pending, want, home, offset = (t.index_select(0, keep) for t in (pending, want, home, offset))
        return torch.cat(failed) if failed else keys.new_empty(0)

    @staticmethod
    def _elect(target_slots: torch.Tensor, claimants: torch.Tensor) -> torch.Tensor:
        """Positions (into claimants) of the smallest claimant per target slot."""
        if claimants.numel() == 0:
            return claimants
        uniq, inverse = torch.unique(target_slots, return_inverse=True)
        best = torch.full_like(uniq, torch.iinfo(torch.int64).max)
        best.scatter_reduce_(0, inverse, claimants, reduce="amin")
        return (best[inverse] == claimants).nonzero().squeeze(1)


def _gather(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``src[index]`` for 1-D src and any-shape index; index_select is the fast CPU path."""
    return src.index_select(0, index.reshape(-1)).view(index.shape)
