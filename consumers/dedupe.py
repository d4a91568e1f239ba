"""Bounded windows of ids, the oldest forgotten first. No Kafka, no clocks.

A :class:`DedupeWindow` remembers the last ``capacity`` distinct ids it was given (a FIFO
queue for the order, a dict for membership), each with the small non-negative integer
*tag* it was first given with. The joiner uses it twice:

* **per partition, at ingest** (:class:`PartitionedDedupe`): producer retries land in the
  same partition (key = user_id), so an id already seen *in that partition* is a retry,
  dropped and counted. The outcome is a function of the partition's own message order
  and never depends on how partitions interleave;
* **across the topic, at finalisation**: event ids (tagged with their partition) and
  exposure request x item x user keys, claimed in canonical event-time order, which is
  the same however partitions interleaved. See :mod:`consumers.joiner`.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from collections.abc import Iterable
from typing import Any

import numpy as np

FORMAT_VERSION = 1
NEW = -1  # what :meth:`DedupeWindow.claim_all` returns for an id it did not remember


class DedupeWindow:
    """The last ``capacity`` distinct ids claimed, with the tag each was first claimed with."""

    def __init__(self, capacity: int, ids: Iterable[int] = (), tags: Iterable[int] | None = None) -> None:
        self.capacity = capacity
        self._order: deque[int] = deque(maxlen=capacity)  # appending to a full queue drops the oldest
        self._tags: dict[int, int] = {}
        self._fill(ids, tags)

    def _fill(self, ids: Iterable[int], tags: Iterable[int] | None) -> None:
        self._order.clear()
        self._tags.clear()
        ids = np.array(list(ids), np.int64)
        self.claim_all(ids, None if tags is None else np.array(list(tags), np.int64))

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, event_id: int) -> bool:
        return event_id in self._tags

    def claim_all(self, event_ids: np.ndarray, tags: np.ndarray | None = None) -> np.ndarray:
        """Per id, in order (later ids see earlier ones): the tag it was first claimed with,
        or :data:`NEW` — then it is remembered with its tag (>= 0, default 0), forgetting
        the oldest id when full. (n,) int64. Runs once per event: when no id repeats (the
        usual case) it is a handful of C-level set and dict operations."""
        ids = event_ids.tolist()
        tag_list = [0] * len(ids) if tags is None else tags.tolist()
        fresh = set(ids)
        if len(fresh) < len(ids) or not self._tags.keys().isdisjoint(fresh):  # iterates the smaller side
            return self._claim_one_by_one(ids, tag_list)
        order, known = self._order, self._tags
        forget = min(len(order) + len(ids) - self.capacity, len(order))
        if forget > 0:
            deque(map(known.__delitem__, islice(order, forget)), maxlen=0)
        keep = max(len(ids) - self.capacity, 0)  # a batch longer than the window keeps its tail
        known.update(zip(ids[keep:], tag_list[keep:]))
        order.extend(ids)
        return np.full(len(ids), NEW, np.int64)

    def _claim_one_by_one(self, ids: list[int], tags: list[int]) -> np.ndarray:
        order, known, capacity = self._order, self._tags, self.capacity
        out: list[int] = []
        for event_id, tag in zip(ids, tags):
            prior = known.get(event_id)
            if prior is None:
                if len(order) == capacity:
                    del known[order[0]]
                known[event_id] = tag
                order.append(event_id)
                out.append(NEW)
            else:
                out.append(prior)
        return np.array(out, np.int64)

    def add(self, event_id: int) -> bool:
        """Remember ``event_id``; True when it was new (not a duplicate)."""
        return int(self.claim_all(np.array([event_id], np.int64))[0]) == NEW

    def admit(self, event_ids: np.ndarray) -> np.ndarray:
        """(n,) bool: True where the id is new; every new id is remembered, in order."""
        return self.claim_all(event_ids) == NEW

    def ids(self) -> np.ndarray:
        """Remembered ids, oldest first (a copy)."""
        return np.array(self._order, np.int64)

    def tags(self) -> np.ndarray:
        """The tag of each of :meth:`ids`."""
        tag = self._tags.__getitem__
        return np.fromiter(map(tag, self._order), np.int64, count=len(self._order))

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "ids": self.ids(), "tags": self.tags()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"dedupe window state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        keep = slice(-self.capacity, None)
        self._fill(np.asarray(state["ids"], np.int64)[keep].tolist(), np.asarray(state["tags"], np.int64)[keep].tolist())


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
