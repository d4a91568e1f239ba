"""Per-user history rings, queried and extended in vectorised segments.

Each user owns one right-aligned row of length L (items, actions, timestamps, hot flags;
zero padding on the left) holding their last L accepted events in canonical order. The joiner
hands over one segment of finalised events at a time, in canonical event-time order:
queries (exposures that need their prefix) see exactly the user's events with a
timestamp *strictly* before their own — earlier segments from the ring, the same segment
from the segment itself — and only then are the segment's events appended. That is the
"update after the sample that needs the prefix is formed" rule, done in bulk.

Layout trick used by :meth:`UserHistory.query_then_append`: for every user in the
segment build ``X = ring (L) ++ that user's segment events`` and lay those blocks end to
end; a query whose user has ``k`` segment events before it reads ``X[end - L : end]``
with ``end = block_start + L + k``; the new ring is the block's last L entries. Both
are single fancy-index gathers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from consumers.idindex import IdIndex

FORMAT_VERSION = 1


@dataclass(slots=True)
class HistoryView:
    """Prefix history of each query row."""

    items: np.ndarray  # (q, L) int64, right-aligned, 0-padded
    actions: np.ndarray  # (q, L) int64 Action codes
    ts: np.ndarray  # (q, L) int64, all < the query's ts
    hot: np.ndarray  # (q, L) bool: the item was hot when the entry was recorded
    length: np.ndarray  # (q,) int64 real entries, 0..L
    prev_ts: np.ndarray  # (q,) int64 ts of the latest entry, 0 when the prefix is empty


class UserHistory:
    def __init__(self, history_len: int, max_users: int) -> None:
        self.L = history_len
        self.index = IdIndex(max_users)
        self._alloc(self.index.allocated)

    def _alloc(self, rows: int) -> None:
        self.items = np.zeros((rows, self.L), np.int64)
        self.actions = np.zeros((rows, self.L), np.int8)
        self.ts = np.zeros((rows, self.L), np.int64)
        self.hot = np.zeros((rows, self.L), np.bool_)
        self.length = np.zeros(rows, np.int64)

    def _fit_index(self) -> None:
        rows = self.index.allocated
        if rows > len(self.length):
            extra = rows - len(self.length)
            self.items = np.concatenate([self.items, np.zeros((extra, self.L), np.int64)])
            self.actions = np.concatenate([self.actions, np.zeros((extra, self.L), np.int8)])
            self.ts = np.concatenate([self.ts, np.zeros((extra, self.L), np.int64)])
            self.hot = np.concatenate([self.hot, np.zeros((extra, self.L), np.bool_)])
            self.length = np.concatenate([self.length, np.zeros(extra, np.int64)])

    def query_then_append(self, users: np.ndarray, ts: np.ndarray, items: np.ndarray, actions: np.ndarray,
                          hot: np.ndarray, query: np.ndarray, push: np.ndarray) -> HistoryView:
        """One segment, rows in canonical order (ts ascending). Returns the prefix of each
        ``query`` row (in row order), then appends the ``push`` rows to the rings. Every
        ``query`` row must be a ``push`` row too (an exposure enters its user's history), so
        each queried user has a block in ``X`` and every prefix is one gather from it."""
        if (query & ~push).any():
            raise ValueError("every query row must also be pushed")
        L = self.L
        n = len(users)
        rows = np.flatnonzero(query | push)
        slots = np.full(n, -1, np.int64)
        slots[rows] = self.index.insert(users[rows], ts[rows])
        self._fit_index()

        pushed = np.flatnonzero(push)  # canonical order
        p_slot = slots[pushed]
        p_order = np.argsort(p_slot, kind="stable")  # group by user, keep time order within
        p_rows = pushed[p_order]
        p_slot = p_slot[p_order]
        group_slots, group_first, group_sizes = np.unique(p_slot, return_index=True, return_counts=True)
        n_groups = len(group_slots)
        block_start = np.arange(n_groups) * L + group_first  # where each user's block begins in X

        x_len = n_groups * L + len(p_rows)
        x_items = np.zeros(x_len, np.int64)
        x_actions = np.zeros(x_len, np.int8)
        x_ts = np.zeros(x_len, np.int64)
        x_hot = np.zeros(x_len, np.bool_)
        ring_pos = (block_start[:, None] + np.arange(L)).reshape(-1)
        x_items[ring_pos] = self.items[group_slots].reshape(-1)
        x_actions[ring_pos] = self.actions[group_slots].reshape(-1)
        x_ts[ring_pos] = self.ts[group_slots].reshape(-1)
        x_hot[ring_pos] = self.hot[group_slots].reshape(-1)
        group_of_event = np.repeat(np.arange(n_groups), group_sizes)
        event_pos = block_start[group_of_event] + L + (np.arange(len(p_rows)) - group_first[group_of_event])
        x_items[event_pos] = items[p_rows]
        x_actions[event_pos] = actions[p_rows]
        x_ts[event_pos] = ts[p_rows]
        x_hot[event_pos] = hot[p_rows]

        view = self._query(np.flatnonzero(query), slots, ts, group_slots, block_start, p_slot, ts[p_rows],
                           x_items, x_actions, x_ts, x_hot)

        # new ring = last L entries of each block
        tail = (block_start + group_sizes)[:, None] + np.arange(L)
        self.items[group_slots] = x_items[tail]
        self.actions[group_slots] = x_actions[tail]
        self.ts[group_slots] = x_ts[tail]
        self.hot[group_slots] = x_hot[tail]
        self.length[group_slots] = np.minimum(L, self.length[group_slots] + group_sizes)
        return view

    def _query(self, q_rows: np.ndarray, slots: np.ndarray, ts: np.ndarray, group_slots: np.ndarray,
               block_start: np.ndarray, p_slot: np.ndarray, p_ts: np.ndarray,
               x_items: np.ndarray, x_actions: np.ndarray, x_ts: np.ndarray, x_hot: np.ndarray) -> HistoryView:
        L = self.L
        q = len(q_rows)
        q_slot = slots[q_rows]
        q_ts = ts[q_rows]
        # k = number of the user's pushed segment events with ts < query ts: sort queries
        # in among pushes by (slot, ts, kind) with queries first at equal ts, then count.
        all_slot = np.concatenate([p_slot, q_slot])
        all_ts = np.concatenate([p_ts, q_ts])
        is_push = np.concatenate([np.ones(len(p_slot), np.int8), np.zeros(q, np.int8)])
        order = np.lexsort((is_push, all_ts, all_slot))
        pushes_before = np.cumsum(is_push[order]) - is_push[order]  # pushes strictly before, all users
        g = np.searchsorted(group_slots, all_slot[order])  # exact: every queried user pushes, so has a group
        k_sorted = pushes_before - np.searchsorted(p_slot, group_slots)[g]  # p_slot is sorted
        is_query_sorted = is_push[order] == 0
        k = np.empty(q, np.int64)
        k[order[is_query_sorted] - len(p_slot)] = k_sorted[is_query_sorted]
        q_group_by_row = np.empty(q, np.int64)
        q_group_by_row[order[is_query_sorted] - len(p_slot)] = g[is_query_sorted]

        ring_len = self.length[q_slot]  # before this segment's appends
        length = np.minimum(L, ring_len + k)
        window = (block_start[q_group_by_row] + k)[:, None] + np.arange(L)  # X[end - L : end], end = start + L + k
        out_items, out_actions, out_ts, out_hot = x_items[window], x_actions[window].astype(np.int64), x_ts[window], x_hot[window]
        prev_ts = np.where(length > 0, out_ts[:, -1], 0)
        return HistoryView(out_items, out_actions, out_ts, out_hot, length, prev_ts)

    def evict_over_capacity(self) -> None:
        freed = self.index.evict_over_capacity()
        self.items[freed] = 0
        self.actions[freed] = 0
        self.ts[freed] = 0
        self.hot[freed] = False
        self.length[freed] = 0

    def state_dict(self) -> dict[str, Any]:
        used = np.flatnonzero(self.index.keys)
        return {"format_version": FORMAT_VERSION, "history_len": self.L, "index": self.index.state_dict(),
                "items": self.items[used], "actions": self.actions[used], "ts": self.ts[used],
                "hot": self.hot[used], "length": self.length[used]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"history state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        if state["history_len"] != self.L:
            raise ValueError(f"history state has L={state['history_len']}, config says {self.L}")
        self.index.load_state_dict(state["index"])
        self._alloc(self.index.allocated)
        used = np.flatnonzero(self.index.keys)
        self.items[used] = state["items"]
        self.actions[used] = state["actions"]
        self.ts[used] = state["ts"]
        self.hot[used] = state["hot"]
        self.length[used] = state["length"]
