"""Fixed-size training batches cut from the joiner's sample stream. No Kafka, no clocks.

The joiner emits samples in chunks whose sizes depend on how messages arrived; a trainer
must see the same batches on every replay (DESIGN §6.1). :class:`SampleBuffer` re-cuts
the stream into batches of exactly ``batch_size`` samples, so batch boundaries depend
only on the sample sequence. Samples emitted but not yet handed out are part of the
buffer's ``state_dict``: after a restart they come out of the buffer, never re-emitted by
the joiner and never lost. This is the one batcher of the project: the daemon, the
ingest benchmark and the tests all cut batches here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from consumers.schema import SAMPLE_FIELDS, SampleBatch, concat_batches, slice_batch

FORMAT_VERSION = 1


class SampleBuffer:
    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.batch_size = batch_size
        self._chunks: list[SampleBatch] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def extend(self, batch: SampleBatch) -> None:
        n = len(batch["sample_id"])
        if n:
            self._chunks.append(batch)
            self._size += n

    def pop_batch(self) -> SampleBatch | None:
        """The next batch of exactly ``batch_size`` samples; ``None`` if not enough yet."""
        if self._size < self.batch_size:
            return None
        return self._take(self.batch_size)

    def drain(self) -> SampleBatch | None:
        """End of a bounded input: the partial remainder (fewer than ``batch_size``), or
        ``None`` when the buffer is empty."""
        return self._take(self._size) if self._size else None

    def _take(self, n: int) -> SampleBatch:
        merged = concat_batches(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        self._size -= n
        self._chunks = [slice_batch(merged, n, n + self._size)] if self._size else []
        return slice_batch(merged, 0, n)

    def state_dict(self) -> dict[str, Any]:
        merged = concat_batches(self._chunks) if self._chunks else None
        return {
            "format_version": FORMAT_VERSION,
            "size": self._size,
            "samples": {k: np.ascontiguousarray(v).copy() for k, v in merged.items()} if merged else {},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"sample buffer format {state.get('format_version')} != {FORMAT_VERSION}")
        samples = dict(state["samples"])
        self._size = int(state["size"])
        if self._size and "emit_ms" not in samples:  # saved before samples carried it: emitted long ago, in order
            samples["emit_ms"] = np.full(self._size, -1, np.int64)
        self._chunks = [{k: np.asarray(samples[k], SAMPLE_FIELDS[k].dtype) for k in SAMPLE_FIELDS}] if self._size else []
        if self._size and len(self._chunks[0]["sample_id"]) != self._size:
            raise ValueError(f"sample buffer state says {self._size} samples but holds {len(self._chunks[0]['sample_id'])}")
