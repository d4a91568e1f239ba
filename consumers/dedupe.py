"""Bounded duplicate filter over event ids, one window per partition.

A window remembers the last ``capacity`` accepted ids of its partition (a FIFO queue plus
a set for O(1) membership). Keeping windows per partition makes the outcome a function of each
partition's own message order: producer retries land in the same partition (key =
user_id), so nothing is lost by not looking across partitions, and the result never
depends on how partitions interleave.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np

FORMAT_VERSION = 1


class DedupeWindow:
    """The last ``capacity`` accepted ids of one partition. The joiner's hot loop tests
    membership on ``seen`` directly, then calls :meth:`add`."""

    def __init__(self, capacity: int, ids: Iterable[int] = ()) -> None:
        self.capacity = capacity
        self.order: deque[int] = deque()
        self.seen: set[int] = set()
        for event_id in ids:
            self.add(event_id)

    def __len__(self) -> int:
        return len(self.order)

    def __contains__(self, event_id: int) -> bool:
        return event_id in self.seen

    def add(self, event_id: int) -> None:
        """Remember a new id, forgetting the oldest when full."""
        if len(self.order) >= self.capacity:
            self.seen.discard(self.order.popleft())
        self.order.append(event_id)
        self.seen.add(event_id)

    def ids(self) -> np.ndarray:
        """Remembered ids, oldest first (a copy)."""
        return np.array(self.order, np.int64)


class PartitionedDedupe:
    """One :class:`DedupeWindow` per partition, created on first use."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._windows: dict[int, DedupeWindow] = {}

    def window(self, partition: int) -> DedupeWindow:
        window = self._windows.get(partition)
        if window is None:
            window = self._windows[partition] = DedupeWindow(self.capacity)
        return window

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION,
                "partitions": {str(p): w.ids() for p, w in sorted(self._windows.items())}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"dedupe state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        self._windows = {int(p): DedupeWindow(self.capacity, np.asarray(ids, np.int64)[-self.capacity:].tolist())
                         for p, ids in state["partitions"].items()}
