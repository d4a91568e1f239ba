"""UserHistory.query_then_append against the rule written the slow, obvious way: a query
sees the user's last L pushed events with a timestamp strictly before its own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.history import UserHistory

L = 4

# one segment: rows of (user, ts step, item, action, kind); kind 0 = push only, 1 = query and push
_row = st.tuples(st.integers(1, 4), st.integers(0, 2), st.integers(1, 50), st.integers(1, 3), st.integers(0, 1))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(_row, max_size=12), min_size=1, max_size=5))
def test_prefix_is_the_last_pushes_strictly_before(segments: list[list[tuple[int, int, int, int, int]]]) -> None:
    history = UserHistory(L, max_users=100)
    pushed: dict[int, list[tuple[int, int, int, bool]]] = {}  # user -> (item, action, ts, hot), canonical order
    t = 1_000
    for rows in segments:
        t += 10_000  # segments are event-time buckets: each one strictly after the last
        ts_list, users, items, actions, query = [], [], [], [], []
        for user, step, item, action, kind in rows:
            t += step  # ascending, with ties
            ts_list.append(t)
            users.append(user)
            items.append(item)
            actions.append(action)
            query.append(kind == 1)
        ts = np.array(ts_list, np.int64)
        hot = np.array([i % 3 == 0 for i in items], np.bool_)
        view = history.query_then_append(np.array(users, np.int64), ts, np.array(items, np.int64),
                                         np.array(actions, np.int8), hot, np.array(query, np.bool_),
                                         np.ones(len(rows), np.bool_))
        expected = []
        for i in np.flatnonzero(query).tolist():
            before = list(pushed.get(users[i], []))
            before += [(items[j], actions[j], ts_list[j], bool(hot[j])) for j in range(len(rows))
                       if users[j] == users[i] and ts_list[j] < ts_list[i]]
            expected.append(before[-L:])
        for q, prefix in enumerate(expected):
            pad = L - len(prefix)
            assert view.length[q] == len(prefix)
            assert view.items[q].tolist() == [0] * pad + [e[0] for e in prefix]
            assert view.actions[q].tolist() == [0] * pad + [e[1] for e in prefix]
            assert view.ts[q].tolist() == [0] * pad + [e[2] for e in prefix]
            assert view.hot[q].tolist() == [False] * pad + [e[3] for e in prefix]
            assert view.prev_ts[q] == (prefix[-1][2] if prefix else 0)
        assert view.items.dtype == view.actions.dtype == view.ts.dtype == np.int64
        for j in range(len(rows)):
            pushed.setdefault(users[j], []).append((items[j], actions[j], ts_list[j], bool(hot[j])))


def test_a_query_that_is_not_pushed_is_refused() -> None:
    history = UserHistory(L, max_users=10)
    one = np.ones(2, np.int64)
    with pytest.raises(ValueError, match="pushed"):
        history.query_then_append(one, np.array([1, 2], np.int64), one, np.ones(2, np.int8), np.zeros(2, np.bool_),
                                  np.array([True, True]), np.array([True, False]))
