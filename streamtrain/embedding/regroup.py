"""Regroup the states of a table's shards by a new owner of each key (re-sharding).

Every key keeps, on its new shard, everything the table holds about it: its row, its
optimizer slots, its frequency and last-seen scores and its touched flag, so a lookup
of any key reads the same values after the regroup as before. Keys evicted since the
last delta (tombstones) follow their owner too. What is per table rather than per key:

* the admission sketch, the default row, ``step`` and ``clock_ms`` are the same on every
  shard of a sharded table (the sketch is replicated: each shard counts every shard's
  missing keys, see ``streamtrain/distributed/sharded_embedding.py``), so every new shard
  gets them as they are — for a table that was never sharded that is also exact: a
  sharded table's sketch *is* the one table's sketch;
* counters are totals: summed into the first new shard, zero in the others.

Rows are laid out anew (old shard by old shard, row order within), so row indices change;
nothing observable depends on them but the tie-break between equally scored eviction
victims.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from streamtrain.embedding.table import FORMAT_VERSION, RESERVED_ROWS

_PER_ROW = ("weight", "row_keys", "freq", "last_seen_ms", "touched")
_SHARED = ("format_version", "dim", "step", "clock_ms")


def regroup_table_states(states: Sequence[Mapping[str, Any]], owner: Callable[[torch.Tensor], torch.Tensor],
                         parts: int, min_rows: int = 1) -> list[dict[str, Any]]:
    """``parts`` table states from ``states`` (the old shards); ``owner(keys)`` gives each
    key's new shard in ``[0, parts)``. Each new state has room for at least ``min_rows`` keys."""
    if not states:
        raise ValueError("no table states to regroup")
    head = states[0]
    for state in states:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"table state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        different = [k for k in _SHARED if state[k] != head[k]]
        if different:
            raise ValueError(f"shards of one table disagree on {different}")
    per_row = [k for k in head if k in _PER_ROW or k.startswith("slot.")]
    live = [(s, (s["row_keys"] != 0).nonzero().squeeze(1)) for s in states]
    rows = {k: torch.cat([s[k].index_select(0, idx) for s, idx in live]) for k in per_row}
    tombstones = torch.cat([s["tombstones"] for s in states])
    key_owner, tomb_owner = owner(rows["row_keys"]), owner(tombstones)
    counters = sorted(k for k in head if k.startswith("counters."))
    out = []
    for part in range(parts):
        take = (key_owner == part).nonzero().squeeze(1)
        size = RESERVED_ROWS + max(take.numel(), min_rows)
        state: dict[str, Any] = {k: head[k] for k in _SHARED}
        for k in per_row:
            column = head[k].new_zeros((size, *head[k].shape[1:]))
            # Pad and default rows (their slots too) are the same on every shard. Free rows
            # stay zero: the table resets a row's slots when it installs a key there.
            column[:RESERVED_ROWS] = head[k][:RESERVED_ROWS]
            column[RESERVED_ROWS:RESERVED_ROWS + take.numel()] = rows[k].index_select(0, take)
            state[k] = column
        state["tombstones"] = tombstones[tomb_owner == part]
        if "sketch.counts" in head:
            state["sketch.counts"] = head["sketch.counts"].clone()
        for k in counters:
            state[k] = sum(int(s[k]) for s in states) if part == 0 else 0
        out.append(state)
    return out
