"""The Kafka source: polls raw messages and tracks offsets. Nothing else.

* Offsets belong to checkpoints: auto-commit is off, :meth:`KafkaSource.positions` says
  where each partition continues (next offset) and :meth:`KafkaSource.seek` puts it
  there. In ``subscribe`` mode a seek that arrives before the group assigned the
  partition is kept and applied in the ``on_assign`` callback; partitions come back at
  the position this source last delivered (not the group's committed offset) after a
  rebalance, so a revoke/assign cycle never skips or repeats messages.
* ``assign`` mode takes every partition of the topic (as it is at start), or those of
  ``only_partitions`` (a scale-out rank's share, possibly none), no group rebalancing:
  the daemon uses it for deterministic replays.
* Broker trouble never raises: errors are logged once per ``stall_log_interval_s`` and
  polling goes on (librdkafka reconnects by itself). Only fatal client errors raise.
* :meth:`commit` is for lag tools; committed offsets are read back only with
  ``resume_from_committed`` (jobs without checkpoints), and never over a known position.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from confluent_kafka import (OFFSET_BEGINNING, OFFSET_END, OFFSET_INVALID, Consumer, KafkaError, KafkaException,
                             Message, TopicPartition)

from consumers.config import KafkaSourceConfig
from consumers.markers import is_end_of_input
from consumers.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

Offsets = dict[str, dict[int, int]]  # {topic: {partition: next offset}}


@dataclass(slots=True)
class MessageBatch:
    """Raw messages of one poll, columnar, in delivery order."""

    values: list[bytes | None] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)  # message keys; DESIGN §3: the user id
    ended: list[int] = field(default_factory=list)  # partitions whose end-of-input marker this poll read

    def __len__(self) -> int:
        return len(self.values)


class PartitionListener(Protocol):
    """Told about assignment changes. Called from inside ``consume()`` (librdkafka runs
    rebalance callbacks in the polling thread), before any message of a newly assigned
    partition is returned and after the last one of a revoked partition."""

    def on_assign(self, partitions: list[int]) -> None: ...

    def on_revoke(self, partitions: list[int]) -> None: ...


class MessageSource(Protocol):
    """What the pipeline needs from a source (Kafka, or the list-backed fake)."""

    topic: str

    def consume(self, max_messages: int, timeout: float) -> MessageBatch: ...

    def positions(self) -> Offsets: ...

    def seek(self, offsets: Mapping[str, Mapping[int, int]]) -> None: ...

    def commit(self, offsets: Mapping[str, Mapping[int, int]]) -> bool:
        """Record offsets for lag tools (never read back over a known position); False if refused."""

    def lag(self) -> dict[int, int]:
        """Messages between each assigned partition's position and its end (>= 0)."""

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def set_listener(self, listener: PartitionListener) -> None: ...

    def close(self) -> None: ...


class KafkaSource:
    """A :class:`MessageSource` over one topic. Where a partition starts: the position
    this source knows (delivered, or a seek target from a checkpoint), else
    ``config.start`` — or, with ``resume_from_committed``, the group's committed offset
    first (for jobs without checkpoints, like ``run_join``). ``clock`` paces the stall
    log lines."""

    def __init__(self, config: KafkaSourceConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.topic = config.topic
        self._errors = RateLimitedLog(config.stall_log_interval_s, clock, log)
        self._listener: PartitionListener | None = None
        self._positions: dict[int, int] = {}  # next offset per partition: delivered, or a seek target
        self._assigned: list[int] = []
        self._unassigned = config.mode == "assign"  # assign mode: until the topic's partitions were taken
        self._paused = False
        self.stale_dropped = 0  # re-delivered messages below our positions (see fresh)
        if config.resume_from_committed:
            self._start = OFFSET_INVALID  # librdkafka: committed offset, else auto.offset.reset
        else:
            self._start = OFFSET_BEGINNING if config.start == "earliest" else OFFSET_END
        self._consumer = Consumer(self._client_config())
        if config.mode == "subscribe":
            self._consumer.subscribe([config.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                     on_lost=self._on_revoke)
        else:
            self._assign_all()  # retried from consume() while the topic is not there yet

    def _client_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "bootstrap.servers": c.bootstrap_servers,
            "group.id": c.group_id,
            "enable.auto.commit": False,  # offsets live in checkpoints
            "enable.auto.offset.store": False,
            "auto.offset.reset": c.start,
            "session.timeout.ms": c.session_timeout_ms,
            "max.poll.interval.ms": c.max_poll_interval_ms,
            "error_cb": self._on_client_error,
            "logger": log,
            **c.client_overrides,
        }

    def set_listener(self, listener: PartitionListener) -> None:
        self._listener = listener
        if self._assigned:
            listener.on_assign(list(self._assigned))

    # ------------------------------------------------------------ assignment
    def _tp(self, partition: int) -> TopicPartition:
        return TopicPartition(self.topic, partition, self._positions.get(partition, self._start))

    def _assign_all(self) -> bool:
        """``assign`` mode: take every partition of the topic, at our positions. False
        (logged) while the topic's metadata is unavailable; ``consume`` retries."""
        try:
            topic = self._consumer.list_topics(self.topic, timeout=5).topics.get(self.topic)
        except KafkaException as exc:
            self._errors.warning("no metadata for topic %s yet: %s", self.topic, exc)
            return False
        if topic is None or topic.error is not None or not topic.partitions:
            self._errors.warning("topic %s not available yet: %s", self.topic, None if topic is None else topic.error)
            return False
        wanted = self.config.only_partitions
        partitions = sorted(p for p in topic.partitions if wanted is None or p in wanted)
        self._consumer.assign([self._tp(p) for p in partitions])
        if self._paused:
            self._consumer.pause([self._tp(p) for p in partitions])
        self._assigned = partitions
        self._unassigned = False
        if self._listener is not None:
            self._listener.on_assign(partitions)
        return True

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            tp.offset = self._positions.get(tp.partition, self._start)
        consumer.assign(partitions)
        if self._paused:
            consumer.pause(partitions)
        added = sorted(tp.partition for tp in partitions)
        self._assigned = sorted(set(self._assigned) | set(added))
        log.info("assigned %s partitions %s", self.topic, added)
        if self._listener is not None:
            self._listener.on_assign(added)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        removed = sorted(tp.partition for tp in partitions)
        self._assigned = [p for p in self._assigned if p not in removed]
        log.info("revoked %s partitions %s", self.topic, removed)
        if self._listener is not None:
            self._listener.on_revoke(removed)

    def assignment(self) -> list[int]:
        return list(self._assigned)

    # ------------------------------------------------------------ polling
    def consume(self, max_messages: int, timeout: float) -> MessageBatch:
        """Up to ``max_messages`` data messages; an empty batch on timeout or trouble."""
        batch = MessageBatch()
        if self._unassigned and not self._assign_all():
            time.sleep(min(timeout, self.config.error_backoff_s))
            return batch
        try:
            messages = self._consumer.consume(max_messages, timeout)
        except KafkaException as exc:
            self._client_trouble(exc.args[0] if exc.args else None, exc)
            return batch
        if any(map(Message.error, messages)):
            failed = [m for m in messages if m.error() is not None]
            for m in failed:
                if m.error().code() != KafkaError._PARTITION_EOF:
                    self._client_trouble(m.error(), m.error())
            messages = [m for m in messages if m.error() is None]
        # Columns with C-level loops: a poll is thousands of messages.
        partitions = np.fromiter(map(Message.partition, messages), np.int64, len(messages))
        offsets = np.fromiter(map(Message.offset, messages), np.int64, len(messages))
        keep = fresh(self._positions, partitions, offsets)
        if not keep.all():
            self.stale_dropped += int((~keep).sum())
            messages = [m for m, fresh in zip(messages, keep.tolist()) if fresh]
            partitions, offsets = partitions[keep], offsets[keep]
        values = list(map(Message.value, messages))
        if None in values or b"" in values:  # maybe end-of-input markers (empty values with a header)
            ended = [not m.value() and is_end_of_input(m.value(), m.headers()) for m in messages]
            if any(ended):
                batch.ended = sorted({m.partition() for m, end in zip(messages, ended) if end})
                messages = [m for m, end in zip(messages, ended) if not end]
                values = [v for v, end in zip(values, ended) if not end]
                data = ~np.array(ended, np.bool_)
                partitions, offsets = partitions[data], offsets[data]
        batch.values = values
        batch.partitions = partitions.tolist()
        batch.offsets = offsets.tolist()
        batch.keys = list(map(Message.key, messages))
        return batch

    def _client_trouble(self, err: KafkaError | None, what: object) -> None:
        if isinstance(err, KafkaError) and err.fatal():
            raise KafkaException(err)
        self._errors.warning("kafka consumer: %s (retrying)", what)
        if self.config.error_backoff_s:
            time.sleep(self.config.error_backoff_s)

    def _on_client_error(self, err: KafkaError) -> None:
        """librdkafka's global error callback (broker down, transport): log, carry on."""
        if err.fatal():
            log.error("fatal kafka client error: %s", err)
        else:
            self._errors.warning("kafka client: %s", err)

    # ------------------------------------------------------------ offsets
    def positions(self) -> Offsets:
        """Next offset per partition: after the last delivered message, or a seek target."""
        return {self.topic: dict(sorted(self._positions.items()))}

    def seek(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        """Continue each given partition at the given next offset (now if assigned, else
        when it gets assigned)."""
        targets = {int(p): int(o) for p, o in offsets.get(self.topic, {}).items()}
        self._positions.update(targets)
        live = [p for p in targets if p in self._assigned]
        if not live:
            return
        try:
            for p in live:
                self._consumer.seek(TopicPartition(self.topic, p, targets[p]))
        except KafkaException:
            # a partition not fetching yet cannot seek (_STATE): re-assign at our positions
            self._consumer.assign([self._tp(p) for p in self._assigned])
            if self._paused:
                self._consumer.pause([self._tp(p) for p in self._assigned])

    def commit(self, offsets: Mapping[str, Mapping[int, int]]) -> bool:
        """Commit next offsets for lag tools; False (logged) when the broker refuses."""
        tps = [TopicPartition(t, int(p), int(o)) for t, parts in offsets.items() for p, o in parts.items()]
        if not tps:
            return True
        try:
            self._consumer.commit(offsets=tps, asynchronous=False)
        except KafkaException as exc:
            self._errors.warning("offset commit failed: %s", exc)
            return False
        return True

    def lag(self) -> dict[int, int]:
        """Messages between each assigned partition's position and its high watermark,
        clamped at 0. The watermark is the one of the last fetch response (librdkafka's
        cached value: no broker round trip per call). A partition with no position yet
        starts at its low watermark (``earliest``) or at its end (``latest``)."""
        out: dict[int, int] = {}
        for p in self._assigned:
            try:
                low, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), cached=True)
            except KafkaException:
                continue
            if high < 0:  # nothing fetched from this partition yet: unknown, not zero
                continue
            position = self._positions.get(p, max(low, 0) if self._start != OFFSET_END else high)
            out[p] = max(0, high - position)
        return out

    # ------------------------------------------------------------ flow control
    def pause(self) -> None:
        """Stop fetching (backpressure); keep calling ``consume`` to stay in the group."""
        self._paused = True
        if self._assigned:
            self._consumer.pause([self._tp(p) for p in self._assigned])

    def resume(self) -> None:
        self._paused = False
        if self._assigned:
            self._consumer.resume([self._tp(p) for p in self._assigned])

    def close(self) -> None:
        self._consumer.close()


def fresh(positions: dict[int, int], partitions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Which messages (in delivery order) are at or beyond their partition's next
    expected offset; moves ``positions`` (partition -> next offset) on past them.

    Hazard: a ``seek`` (a restore from a checkpoint) issued just after ``assign`` can
    race librdkafka's first fetch, which then delivers messages from the old position.
    Delivering them would train them twice; positions are the truth, so anything
    before them is a stale re-delivery. Forward gaps are normal (compaction, markers).
    """
    keep = np.ones(len(offsets), np.bool_)
    for partition in np.unique(partitions).tolist():
        at = np.flatnonzero(partitions == partition)
        mine = offsets[at]
        # A message is expected at or past every earlier one + 1 (a stale one is below
        # that bound already, so counting it changes nothing) and the stored position.
        floor = np.maximum.accumulate(np.concatenate(([positions.get(partition, -1)], mine[:-1] + 1)))
        keep[at] = mine >= floor
        positions[partition] = max(positions.get(partition, -1), int(mine.max()) + 1)
    return keep
