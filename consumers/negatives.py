"""Rank-package slots from a history prefix, and random negatives from an item pool.

Randomness is counter-based: every draw is ``splitmix64`` of (seed, sample_id, stream,
draw number), so a sample's negatives are a pure function of the sample — identical in a
replay however the samples were batched — and vectorise over the batch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from consumers.hashing import splitmix64
from consumers.schema import RANK_PACKAGE_SLOTS, Action, Slot

FORMAT_VERSION = 1
_STREAM_RANDOM_SLOT = 1
_STREAM_NEGATIVES = 2
_U64 = (1 << 64) - 1


def draws(sample_ids: np.ndarray, seed: int, stream: int, k: int) -> np.ndarray:
    """(n, k) uint64 pseudo-random numbers, a pure function of the arguments."""
    salt = splitmix64(np.array([(seed * 1_000_003 + stream) & _U64], np.uint64))[0]
    base = splitmix64(sample_ids.astype(np.int64).view(np.uint64) ^ salt)
    return splitmix64(base[:, None] + np.arange(1, k + 1, dtype=np.uint64)[None, :])


def _last_true(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(column of the last True in each row, whether the row has one)."""
    L = mask.shape[1]
    return L - 1 - np.argmax(mask[:, ::-1], axis=1), mask.any(axis=1)


def rank_package(items: np.ndarray, hist_items: np.ndarray, hist_actions: np.ndarray, hot: np.ndarray,
                 sample_ids: np.ndarray, seed: int) -> np.ndarray:
    """(n, 5) Slot-ordered negatives drawn from each prefix (0 = none):
    the most recent cold/hot clicked item, the most recent cold/hot item exposed but not
    clicked within the prefix, and one uniformly random prefix item. Entries equal to the
    sample's own item are never used; ``hot`` flags each history entry."""
    n = len(items)
    out = np.zeros((n, RANK_PACKAGE_SLOTS), np.int64)
    if n == 0:
        return out
    usable = (hist_actions != Action.PAD) & (hist_items != items[:, None])  # (n, L)
    clicked = usable & ((hist_actions == Action.CLICK) | (hist_actions == Action.CONVERT))
    # An exposure counts as clicked when its item was clicked anywhere in the prefix.
    # Clicks are rare: lay each row's clicked items out in a few columns and compare
    # column by column (a (n, L, L) broadcast costs ~10x more).
    click_rows, click_cols = np.nonzero(clicked)
    rank_in_row = np.arange(len(click_rows)) - np.searchsorted(click_rows, click_rows)
    item_clicked = np.zeros_like(clicked)
    if len(click_rows):
        click_items = np.zeros((n, int(rank_in_row.max()) + 1), np.int64)
        click_items[click_rows, rank_in_row] = hist_items[click_rows, click_cols]
        for k in range(click_items.shape[1]):
            item_clicked |= hist_items == click_items[:, k:k + 1]
    exposed_only = usable & (hist_actions == Action.EXPOSURE) & ~item_clicked
    rows = np.arange(n)
    for slot, mask in ((Slot.COLD_CLICK, clicked & ~hot), (Slot.HOT_CLICK, clicked & hot),
                       (Slot.COLD_EXPOSURE, exposed_only & ~hot), (Slot.HOT_EXPOSURE, exposed_only & hot)):
        col, has = _last_true(mask)
        out[:, slot] = np.where(has, hist_items[rows, col], 0)
    # RANDOM: the k-th usable entry of the row, k drawn per sample
    use_rows, use_cols = np.nonzero(usable)
    count = np.bincount(use_rows, minlength=n)
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])
    k = (draws(sample_ids, seed, _STREAM_RANDOM_SLOT, 1)[:, 0] % np.maximum(count, 1).astype(np.uint64)).astype(np.int64)
    has = count > 0
    out[has, Slot.RANDOM] = hist_items[rows[has], use_cols[starts[has] + k[has]]]
    return out


class ItemPool:
    """Ring of the most recent exposed items; negatives are drawn from the snapshot taken
    at the last refresh (so they depend on event time only). Drawing from exposures makes
    negatives popularity-weighted, like the traffic the model is scored on."""

    def __init__(self, size: int) -> None:
        self._ring = np.zeros(size, np.int64)
        self._next = 0
        self._filled = 0
        self._snapshot = np.zeros(0, np.int64)

    def observe(self, items: np.ndarray) -> None:
        """Append ``items`` to the ring. Observing in chunks or at once gives the same ring:
        of a chunk longer than the ring only the tail survives, at the places it would take
        had every item been written (the joiner's segments follow its advances)."""
        size, n = len(self._ring), len(items)
        tail = items[-size:]
        pos = (self._next + (n - len(tail)) + np.arange(len(tail))) % size
        self._ring[pos] = tail
        self._next = int((self._next + n) % size)
        self._filled = min(size, self._filled + n)

    def refresh(self) -> None:
        self._snapshot = self._ring[: self._filled].copy()

    def sample(self, sample_ids: np.ndarray, positives: np.ndarray, k: int, seed: int) -> np.ndarray:
        """(n, k) items from the snapshot, never equal to the row's positive (0 if the
        pool has nothing else to offer)."""
        n = len(sample_ids)
        pool = self._snapshot
        if k == 0 or len(pool) == 0:
            return np.zeros((n, k), np.int64)
        idx = (draws(sample_ids, seed, _STREAM_NEGATIVES, k) % np.uint64(len(pool))).astype(np.int64)
        neg = pool[idx]
        clash = neg == positives[:, None]
        neg[clash] = pool[(idx[clash] + 1) % len(pool)]
        neg[neg == positives[:, None]] = 0
        return neg

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "ring": self._ring.copy(), "next": self._next,
                "filled": self._filled, "snapshot": self._snapshot.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"item pool state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        ring = np.array(state["ring"], np.int64)
        if len(ring) != len(self._ring):
            raise ValueError(f"item pool state has size {len(ring)}, config says {len(self._ring)}")
        self._ring = ring
        self._next = int(state["next"])
        self._filled = int(state["filled"])
        self._snapshot = np.array(state["snapshot"], np.int64)
