"""KafkaSource's stale re-delivery rule, vectorised, against the per-message walk it replaced."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from consumers.source import fresh


def walk(positions: dict[int, int], messages: list[tuple[int, int]]) -> list[bool]:
    """The reference: one message at a time, a position moves past each kept one."""
    keep = []
    for partition, offset in messages:
        ok = offset >= positions.get(partition, -1)
        if ok:
            positions[partition] = offset + 1
        keep.append(ok)
    return keep


@given(st.dictionaries(st.integers(0, 3), st.integers(0, 30), max_size=4),
       st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40)), max_size=40))
def test_fresh_is_the_per_message_walk(start: dict[int, int], messages: list[tuple[int, int]]) -> None:
    expected_positions = dict(start)
    expected = walk(expected_positions, messages)
    positions = dict(start)
    partitions = np.array([m[0] for m in messages], np.int64)
    offsets = np.array([m[1] for m in messages], np.int64)
    assert fresh(positions, partitions, offsets).tolist() == expected
    assert positions == expected_positions
