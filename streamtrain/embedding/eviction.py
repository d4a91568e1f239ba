"""Eviction policies as pure functions of per-row scores: which rows leave.

Scores are per row: ``freq`` (occurrences while admitted, halved periodically) and
``last_seen_ms`` (event time of the last training lookup). ``lfu`` orders rows by
``freq``, ``lru`` and ``ttl`` by ``last_seen_ms``; ties go to the lower row index, so a
replay evicts the same rows. ``ttl`` additionally drops every row unseen for ``ttl_ms``
on its periodic pass. Selection is O(rows) (``kthvalue``), not a full sort.
"""

from __future__ import annotations

import math

import torch

from streamtrain.embedding.config import EvictionConfig


def _order_score(config: EvictionConfig, freq: torch.Tensor, last_seen_ms: torch.Tensor) -> torch.Tensor:
    return freq if config.policy == "lfu" else last_seen_ms


def smallest(score: torch.Tensor, eligible: torch.Tensor, k: int) -> torch.Tensor:
    """Row indices (ascending) of the ``k`` eligible rows with the smallest score.

    score: (R,) int64, eligible: (R,) bool. Ties at the k-th score go to lower rows.
    """
    rows = eligible.nonzero().squeeze(1)  # (E,)
    if k <= 0:
        return rows[:0]
    if k >= rows.numel():
        return rows
    s = score.index_select(0, rows)  # (E,)
    kth = torch.kthvalue(s, k).values
    below = s < kth
    ties = (s == kth).nonzero().squeeze(1)[: k - int(below.sum())]
    take = below.index_fill_(0, ties, True)
    return rows[take]


def periodic_victims(
    config: EvictionConfig,
    freq: torch.Tensor,
    last_seen_ms: torch.Tensor,
    evictable: torch.Tensor,
    now_ms: int,
    size: int,
    max_rows: int,
) -> torch.Tensor:
    """Rows to drop on the every-N-steps pass (ascending row indices).

    ttl: every evictable row unseen since ``now_ms - ttl_ms``. Every policy but ``none``
    then trims a table of ``size`` live rows from above ``high_watermark * max_rows`` down
    to ``low_watermark * max_rows`` in policy order. evictable: (R,) bool (live, unpinned).
    """
    victims = torch.zeros_like(evictable)  # (R,) bool
    if config.policy == "none":
        return victims.nonzero().squeeze(1)
    if config.policy == "ttl":
        victims = evictable & (last_seen_ms < now_ms - config.ttl_ms)
    remaining = size - int(victims.sum())
    if remaining > config.high_watermark * max_rows:
        score = _order_score(config, freq, last_seen_ms)
        trim = smallest(score, evictable & ~victims, remaining - math.floor(config.low_watermark * max_rows))
        victims.index_fill_(0, trim, True)
    return victims.nonzero().squeeze(1)


def room_victims(
    config: EvictionConfig,
    freq: torch.Tensor,
    last_seen_ms: torch.Tensor,
    evictable: torch.Tensor,
    needed: int,
    size: int,
    max_rows: int,
) -> torch.Tensor:
    """Rows to drop so that ``needed`` new rows fit in a full table (ascending indices).

    Frees enough to land at ``low_watermark`` after the insert (at least ``needed`` minus
    the free rows), so a full table is not searched again on the very next step.
    """
    if config.policy == "none":
        return evictable.nonzero().squeeze(1)[:0]
    k = max(needed - (max_rows - size), size + needed - math.floor(config.low_watermark * max_rows))
    return smallest(_order_score(config, freq, last_seen_ms), evictable, k)
