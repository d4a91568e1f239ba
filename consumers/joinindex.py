"""Open exposures by (request_id x item_id) pair: where a click or conversion may join.

The pair alone is not the join key — labels join only to an exposure of the same user
(DESIGN §6.7) — but the pair is what tells a click that carries another user's id
(``label_user_mismatch``) from one with no exposure at all (``orphan_*``). A request id is
normally one user's, so a pair almost always has one open exposure: those live in a plain
``pair -> row`` dict updated in bulk, and only pairs shared by several rows pay for a list.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np


class OpenExposures:
    """pair -> pool rows of the live exposures with that pair, in the order they were added
    (canonical event-time order: the joiner adds each segment's exposures as it finalises it)."""

    def __init__(self) -> None:
        self._one: dict[int, int] = {}  # pairs with exactly one row
        self._many: dict[int, list[int]] = {}  # pairs with several rows, oldest first

    def add(self, pairs: np.ndarray, rows: np.ndarray) -> None:
        """Make ``rows`` (new exposures, canonical order) findable by their ``pairs``."""
        keys, values = pairs.tolist(), rows.tolist()
        if len(set(keys)) == len(keys) and self._one.keys().isdisjoint(keys) and self._many.keys().isdisjoint(keys):
            self._one.update(zip(keys, values))  # the usual case: every pair new
            return
        for pair, row in zip(keys, values):
            if pair in self._many:
                self._many[pair].append(row)
            elif pair in self._one:
                self._many[pair] = [self._one.pop(pair), row]
            else:
                self._one[pair] = row

    def rows(self, pair: int) -> Sequence[int]:
        """Rows with ``pair``, oldest first (empty when none)."""
        row = self._one.get(pair)
        return self._many.get(pair, ()) if row is None else (row,)

    def remove(self, pairs: np.ndarray, rows: np.ndarray) -> None:
        """Forget released rows (``pairs[i]`` is the pair of ``rows[i]``)."""
        keys = pairs.tolist()
        if self._many.keys().isdisjoint(keys):
            deque(map(self._one.__delitem__, keys), maxlen=0)  # the usual case, at C speed
            return
        for pair, row in zip(keys, rows.tolist()):
            shared = self._many.get(pair)
            if shared is None:
                del self._one[pair]
                continue
            shared.remove(row)
            if len(shared) == 1:
                self._one[pair] = self._many.pop(pair)[0]

    def rebuild(self, pairs: np.ndarray, rows: np.ndarray) -> None:
        """Start over from live rows given in canonical order."""
        self._one, self._many = {}, {}
        self.add(pairs, rows)
