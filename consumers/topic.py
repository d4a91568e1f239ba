"""The topic-wide part of the joiner when several joiners share one topic. No Kafka, no clocks.

Most joiner state is a function of one partition (admission, pending samples, user
histories: the key is the user). Popularity counters and the item pool are not: they
count every partition's finalised events, in canonical order. A joiner that owns only
some partitions (one rank of a scale-out run, ``streamtrain/distributed``) keeps those
two equal to a sole joiner's through a :class:`TopicExchange`: at each finalisation
every joiner learns which refresh buckets any of them finalises (so all refresh at the
same event-time boundaries), and after each bucket's join every joiner observes every
joiner's accepted events of that bucket, merged into canonical order.

Both calls are collective: every joiner sharing the topic makes them in the same
sequence (they advance to the same watermark together). :class:`SoleJoiner`, the
default, is the identity: one joiner owns the whole topic.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from consumers.schema import EventBatch


class TopicExchange(Protocol):
    def buckets(self, local: np.ndarray) -> np.ndarray:
        """The refresh buckets (``ts // stats_refresh_ms``) finalised now by any joiner,
        sorted and unique; ``local`` are this joiner's (sorted, unique, int64)."""

    def share(self, events: EventBatch, push: np.ndarray) -> tuple[EventBatch, np.ndarray]:
        """Every joiner's accepted events of the current bucket in canonical order
        ``(ts, type, event id, partition, offset)``, with their push flags (accepted into
        histories and popularity). ``events`` (canonical order) and ``push`` are this
        joiner's. Only ``ts``, ``etype``, ``eid``, ``user``, ``item``, ``partition`` and
        ``offset`` of the result are meaningful."""


class SoleJoiner:
    """The joiner owns every partition: its own events are the topic's."""

    def buckets(self, local: np.ndarray) -> np.ndarray:
        return local

    def share(self, events: EventBatch, push: np.ndarray) -> tuple[EventBatch, np.ndarray]:
        return events, push
