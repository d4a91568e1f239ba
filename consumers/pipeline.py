"""Source -> decode -> join -> sample batches (and DLQ records), driven by ``poll``.

Merge rule for several partitions (DESIGN §6.1)
-----------------------------------------------
Messages are processed in whatever order the source delivers them, and that is safe:
the joiner's output is a pure function of *each partition's own message sequence*
(see :mod:`consumers.joiner`). Everything order-sensitive is per partition (dedupe
window, the too-late test against the partition's own watermark) or happens in
canonical event-time order ``(ts, type, event-id hash)`` behind the joiner watermark
(labels, histories, popularity, negatives), and samples leave in the global order
``(emit time, ts, sample_id, is_correction)``. So no interleaving of partitions, no
poll size and no timing of ``advance`` changes which samples come out or their order.

Batch boundaries follow that sequence, never wall time: with ``batch_size`` set, every
batch ``poll`` returns has exactly ``batch_size`` rows, cut from the sample sequence, and
the remainder waits in the pipeline state (``carry``). ``state_dict()`` taken between
polls holds the joiner state, the carry and the positions together; restoring it and
re-reading from those positions reproduces the identical batch sequence. Exceptions,
all counted: the overload valves of the joiner, changes of the partition assignment,
and Redis-backed popularity (external state).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from consumers.decode import DECODE_COUNTERS, EventDecoder
from consumers.dlq import DlqSink
from consumers.joiner import LabelJoiner
from consumers.reasons import Reason, Rejection
from consumers.schema import SAMPLE_FIELDS, SampleBatch, concat_batches, empty_batch, slice_batch
from consumers.source import MessageSource, Offsets

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

STATS = (
    "messages",  # consumed from the source
    *DECODE_COUNTERS,  # accepted events with degraded feature values (docs/events.md)
)


class Rebatcher:
    """Cuts a stream of variable-size batches into batches of exactly ``size`` rows."""

    def __init__(self, size: int, carry: SampleBatch) -> None:
        self.size = size
        self.carry = carry  # rows emitted but not yet returned, fewer than size

    def push(self, batch: SampleBatch) -> list[SampleBatch]:
        if len(batch["sample_id"]) == 0:
            return []
        rows = concat_batches([self.carry, batch])
        n = len(rows["sample_id"])
        full = n - n % self.size
        out = [{k: v.copy() for k, v in slice_batch(rows, i, i + self.size).items()} for i in range(0, full, self.size)]
        self.carry = {k: v.copy() for k, v in slice_batch(rows, full, n).items()}
        return out

    def drain(self) -> SampleBatch:
        """The partial remainder (end of input), leaving the carry empty."""
        rest, self.carry = self.carry, slice_batch(self.carry, 0, 0)
        return rest


class IngestPipeline:
    """Wire a source, decoder, joiner and DLQ sink; the caller owns the loop.

    ``batch_size=None`` returns whatever each poll emitted (one batch, possibly empty
    polls return none); set it when batches are training steps.
    """

    def __init__(self, source: MessageSource, decoder: EventDecoder, joiner: LabelJoiner, dlq: DlqSink,
                 batch_size: int | None = None) -> None:
        declared = (joiner.config.sparse_features, joiner.config.dense_features)
        if decoder.features != declared:
            raise ValueError(f"decoder features {decoder.features} differ from the joiner's {declared}: pass "
                             "JoinerConfig.sparse_features/dense_features to the decoder (they size the batch columns)")
        self.source = source
        self.decoder = decoder
        self.joiner = joiner
        self.dlq = dlq
        empty = empty_batch(joiner.L, joiner.K, joiner.S, joiner.D)
        self._rebatch = Rebatcher(batch_size, empty) if batch_size else None
        self.dlq_counts: dict[str, int] = {r.value: 0 for r in Reason}
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        source.set_listener(self)

    # ------------------------------------------------------------ rebalance hooks
    def on_assign(self, partitions: list[int]) -> None:
        self.joiner.assign(partitions)

    def on_revoke(self, partitions: list[int]) -> None:
        self.joiner.revoke(partitions)

    # ------------------------------------------------------------ the loop
    def poll(self, max_messages: int = 2000, timeout: float = 0.5) -> list[SampleBatch]:
        """Consume up to ``max_messages``, join, and return the finished sample batches."""
        messages = self.source.consume(max_messages, timeout)
        rejections: list[Rejection] = []
        if len(messages):
            self.stats["messages"] += len(messages)
            decoded = self.decoder.decode(messages.values, messages.partitions, messages.offsets, messages.keys)
            for name, count in decoded.counters.items():
                self.stats[name] += count
            rejections += decoded.rejections
            rejections += self.joiner.ingest(decoded.events)
        emission = self.joiner.advance()
        rejections += emission.rejections
        self._dead_letter(rejections)
        return self._out(emission.samples)

    def flush(self) -> list[SampleBatch]:
        """End of a bounded input: emit everything pending, including a final partial batch."""
        emission = self.joiner.flush()
        self._dead_letter(emission.rejections)
        out = self._out(emission.samples)
        if self._rebatch is not None:
            rest = self._rebatch.drain()
            if len(rest["sample_id"]):
                out.append(rest)
        return out

    def _out(self, samples: SampleBatch) -> list[SampleBatch]:
        if self._rebatch is not None:
            return self._rebatch.push(samples)
        return [samples] if len(samples["sample_id"]) else []

    def _dead_letter(self, rejections: list[Rejection]) -> None:
        if not rejections:
            return
        for r in rejections:
            self.dlq_counts[r.reason.value] += 1
        self.dlq.send(rejections)

    # ------------------------------------------------------------ offsets and flow control
    def positions(self) -> Offsets:
        """Next offset per partition; everything before it is reflected in ``state_dict()``."""
        return self.source.positions()

    def seek(self, offsets: Mapping[str, Mapping[int, int]]) -> None:
        self.source.seek(offsets)

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
        """Every counter, flat: ``dlq.<reason>``, pipeline stats and joiner counters."""
        return {**{f"dlq.{k}": v for k, v in self.dlq_counts.items()}, **self.stats, **self.joiner.counters}

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Joiner state, undelivered rows and positions, captured together (between polls)."""
        carry = self._rebatch.carry if self._rebatch is not None else None
        return {
            "format_version": FORMAT_VERSION,
            "positions": {t: {str(p): o for p, o in parts.items()} for t, parts in self.positions().items()},
            "joiner": self.joiner.state_dict(),
            "dlq_counts": dict(self.dlq_counts),
            "stats": dict(self.stats),
            "carry": None if carry is None else {k: v.copy() for k, v in carry.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore, then seek the source to the saved positions."""
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"pipeline state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        if (state["carry"] is None) != (self._rebatch is None):
            raise ValueError("pipeline state and this pipeline disagree on batch_size being set")
        self.joiner.load_state_dict(state["joiner"])
        self.dlq_counts = {r.value: 0 for r in Reason} | {k: int(v) for k, v in state["dlq_counts"].items()}
        self.stats = dict.fromkeys(STATS, 0) | {k: int(v) for k, v in state["stats"].items()}
        if self._rebatch is not None:
            carry = {name: np.asarray(state["carry"][name], SAMPLE_FIELDS[name].dtype) for name in SAMPLE_FIELDS}
            if len(carry["sample_id"]) >= self._rebatch.size:
                raise ValueError("pipeline state carries a full batch: batch_size changed since it was saved")
            self._rebatch.carry = carry
        self.seek({t: {int(p): int(o) for p, o in parts.items()} for t, parts in state["positions"].items()})
