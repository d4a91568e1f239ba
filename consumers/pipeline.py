"""Source -> decode -> join -> sample batches (and DLQ records), driven by ``poll``.

Merge rule for several partitions (DESIGN §6.1)
-----------------------------------------------
Messages are processed in whatever order the source delivers them, and that is safe:
the joiner's output is a pure function of *each partition's own message sequence*
(see :mod:`consumers.joiner`). Everything order-sensitive is per partition (dedupe
window, the too-late test against the partition's own watermark) or happens in
canonical event-time order ``(ts, type, event-id hash, partition, offset)`` behind the joiner watermark
(labels, histories, popularity, negatives), and samples leave in the global order
``(emit time, ts, sample_id, is_correction)``. So no interleaving of partitions, no
poll size and no timing of ``advance`` changes which samples come out or their order.

What ``poll`` returns are the samples each poll emitted, as the joiner emitted them;
fixed-size training batches are cut from that sequence by
:class:`~consumers.batching.SampleBuffer`. ``state_dict()`` taken between polls holds the
joiner state; :meth:`IngestPipeline.positions` says where each partition continues.
A checkpoint stores the two together (the positions once, in its manifest); restoring
the state and then seeking to those positions reproduces the identical sample sequence.
Exceptions, all counted: the overload valves of the joiner and changes of the partition
assignment. Redis-backed popularity is external state, but it enters only at ``sync()``
and is held in the joiner state (``consumers/popularity.py``), so it replays too.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consumers.decode import DECODE_COUNTERS, EventDecoder
from consumers.dlq import DlqSink
from consumers.joiner import Emission, LabelJoiner
from consumers.reasons import Reason, Rejection
from consumers.schema import SampleBatch
from consumers.source import MessageSource, Offsets

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: positions and the sample carry left the state (manifest offsets; SampleBuffer); ended partitions

STATS = (
    "messages",  # consumed from the source
    *DECODE_COUNTERS,  # accepted events with degraded feature values (docs/events.md)
)


@dataclass(frozen=True)
class PollReport:
    """What the last poll consumed and dead-lettered (joiner rejections included: they
    may be of messages consumed earlier)."""

    messages: int
    dead_lettered: Counter[str]  # reason -> records

    def mostly_dead(self, at_least: int = 20) -> bool:
        """Most of a poll of at least ``at_least`` messages went to the DLQ."""
        return self.messages >= at_least and 2 * sum(self.dead_lettered.values()) > self.messages


class IngestPipeline:
    """Wire a source, decoder, joiner and DLQ sink; the caller owns the loop.

    ``poll`` returns the samples that poll emitted (a list of at most one batch). This is
    the pipeline's whole surface for a runtime: poll/flush, positions/seek/commit/lag,
    pause/resume, the joiner watermark, DLQ delivery, counters, state.
    """

    def __init__(self, source: MessageSource, decoder: EventDecoder, joiner: LabelJoiner, dlq: DlqSink) -> None:
        declared = (joiner.config.sparse_features, joiner.config.dense_features)
        if decoder.features != declared:
            raise ValueError(f"decoder features {decoder.features} differ from the joiner's {declared}: pass "
                             "JoinerConfig.sparse_features/dense_features to the decoder (they size the batch columns)")
        self.source = source
        self.decoder = decoder
        self.joiner = joiner
        self.dlq = dlq
        self.dlq_counts: dict[str, int] = {r.value: 0 for r in Reason}
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        self.last_poll = PollReport(0, Counter())
        self._assigned: set[int] = set()
        self._ended: set[int] = set()  # partitions whose end-of-input marker was read (consumers/markers.py)
        source.set_listener(self)

    # ------------------------------------------------------------ rebalance hooks
    def on_assign(self, partitions: list[int]) -> None:
        self._assigned.update(partitions)
        self.joiner.assign(partitions)

    def on_revoke(self, partitions: list[int]) -> None:
        self._assigned.difference_update(partitions)
        self.joiner.revoke(partitions)

    # ------------------------------------------------------------ the loop
    def poll(self, max_messages: int = 2000, timeout: float = 0.5) -> list[SampleBatch]:
        """Consume up to ``max_messages``, join, and return the samples emitted (if any)."""
        self.ingest(max_messages, timeout)
        # Every assigned partition ended: nothing can come before any pending window closes.
        return self.release(self.joiner.flush() if self.end_of_input else self.joiner.advance())

    def ingest(self, max_messages: int = 2000, timeout: float = 0.5) -> None:
        """The first half of :meth:`poll`: consume, decode and admit into the joiner, but
        leave the watermark where it is. Joiners sharing a topic (scale-out) ingest on
        their own, agree on a watermark, then advance together and :meth:`release`."""
        messages = self.source.consume(max_messages, timeout)
        rejections: list[Rejection] = []
        if len(messages):
            self.stats["messages"] += len(messages)
            decoded = self.decoder.decode(messages.values, messages.partitions, messages.offsets, messages.keys)
            for name, count in decoded.counters.items():
                self.stats[name] += count
            rejections += decoded.rejections
            rejections += self.joiner.ingest(decoded.events)
        self._ended.update(messages.ended)
        self._dead_letter(rejections)
        self.last_poll = PollReport(len(messages), Counter(r.reason.value for r in rejections))

    def release(self, emission: Emission) -> list[SampleBatch]:
        """The second half of :meth:`poll`: dead-letter what the joiner's advance (or
        flush) rejected and return its samples (if any)."""
        self._dead_letter(emission.rejections)
        rejected = Counter(r.reason.value for r in emission.rejections)
        self.last_poll = PollReport(self.last_poll.messages, self.last_poll.dead_lettered + rejected)
        return _nonempty(emission.samples)

    def flush(self) -> list[SampleBatch]:
        """End of a bounded input: emit everything pending."""
        emission = self.joiner.flush()
        self._dead_letter(emission.rejections)
        return _nonempty(emission.samples)

    def _dead_letter(self, rejections: list[Rejection]) -> None:
        if not rejections:
            return
        for r in rejections:
            self.dlq_counts[r.reason.value] += 1
        self.dlq.send(rejections)

    @property
    def end_of_input(self) -> bool:
        """Every assigned partition has reached its end-of-input marker: after the poll that
        read the last one, every sample has been emitted."""
        return bool(self._assigned) and self._assigned <= self._ended

    @property
    def watermark(self) -> int:
        """The joiner's event-time watermark (ms): samples with windows before it are out."""
        return int(self.joiner.watermark)

    @property
    def held(self) -> dict[str, int]:
        """What the joiner holds now: samples pending their labels, events waiting for the
        watermark, events quarantined ahead of their partition's clock."""
        return {"pending_samples": self.joiner.pending, "buffered_events": self.joiner.buffered,
                "quarantined_events": self.joiner.quarantined}

    def deliver_dlq(self, timeout_s: float) -> int:
        """Wait until the DLQ records produced so far are delivered; returns how many are not."""
        return self.dlq.flush(timeout_s)

    # ------------------------------------------------------------ offsets and flow control
    def positions(self) -> Offsets:
        """Next offset per partition; everything before it is reflected in ``state_dict()``."""
        return self.source.positions()

    def seek(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        self.source.seek(offsets)

    def commit(self, offsets: Mapping[str, Mapping[int, int]]) -> bool:
        """Commit offsets to the source's group, for lag tools only (checkpoints are the truth)."""
        return self.source.commit(offsets)

    def lag(self) -> dict[int, int]:
        """Messages behind the end of each assigned partition (see ``MessageSource.lag``)."""
        return self.source.lag()

    def pause(self) -> None:
        self.source.pause()

    def resume(self) -> None:
        self.source.resume()

    def close(self, timeout_s: float = 30.0) -> int:
        """Deliver pending DLQ records and leave the group; returns undelivered records."""
        undelivered = self.dlq.flush(timeout_s)
        self.source.close()
        return undelivered

    @property
    def counters(self) -> dict[str, int]:
        """Every counter, flat: ``dlq.<reason>``, pipeline stats, joiner counters and the
        popularity source's (``popularity.<name>``, counters of this process)."""
        popularity = {f"popularity.{k}": v for k, v in self.joiner.popularity.counters.items()}
        return {**{f"dlq.{k}": v for k, v in self.dlq_counts.items()}, **self.stats, **self.joiner.counters, **popularity}

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Joiner state and counters (between polls). The positions are not in it: the
        caller stores :meth:`positions` beside it (one source of truth for offsets) and
        calls :meth:`seek` with them after :meth:`load_state_dict`."""
        return {
            "format_version": FORMAT_VERSION,
            "joiner": self.joiner.state_dict(),
            "dlq_counts": dict(self.dlq_counts),
            "stats": dict(self.stats),
            "ended": sorted(self._ended),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; then :meth:`seek` to the positions saved with this state."""
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"pipeline state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        self.joiner.load_state_dict(state["joiner"])
        self.dlq_counts = {r.value: 0 for r in Reason} | {k: int(v) for k, v in state["dlq_counts"].items()}
        self.stats = dict.fromkeys(STATS, 0) | {k: int(v) for k, v in state["stats"].items()}
        self._ended = {int(p) for p in state["ended"]}


def _nonempty(samples: SampleBatch) -> list[SampleBatch]:
    return [samples] if len(samples["sample_id"]) else []
