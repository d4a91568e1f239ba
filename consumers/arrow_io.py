"""Sample batches as Arrow IPC record batches, for the ``samples`` topic.

One Kafka message = one IPC stream holding one record batch. Column names and dtypes
are those of :data:`consumers.schema.SAMPLE_FIELDS`; ``(B, X)`` fields are
``fixed_size_list<X>`` columns, so a reader gets the shapes back without side metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from consumers.produce import BlockingProducer
from consumers.schema import SAMPLE_FIELDS, SampleBatch, slice_batch, validate_batch


def _column(values: np.ndarray) -> pa.Array:
    if values.ndim == 1:
        return pa.array(values)
    flat = pa.array(np.ascontiguousarray(values).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def batch_to_ipc(batch: SampleBatch) -> bytes:
    """Encode one (valid) sample batch as an Arrow IPC stream."""
    validate_batch(batch)
    record = pa.RecordBatch.from_arrays([_column(batch[name]) for name in SAMPLE_FIELDS], names=list(SAMPLE_FIELDS))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, record.schema) as writer:
        writer.write_batch(record)
    return sink.getvalue().to_pybytes()


def ipc_to_batch(payload: bytes) -> SampleBatch:
    """Decode :func:`batch_to_ipc` output back to a sample batch (arrays own their memory)."""
    table = pa.ipc.open_stream(payload).read_all().combine_chunks()
    out: SampleBatch = {}
    for name, spec in SAMPLE_FIELDS.items():
        column = table.column(name).combine_chunks()
        if spec.shape:
            width = column.type.list_size
            values = column.flatten().to_numpy(zero_copy_only=False)
            out[name] = np.array(values, dtype=spec.dtype).reshape(len(column), width)
        else:
            out[name] = np.array(column.to_numpy(zero_copy_only=False), dtype=spec.dtype)
    validate_batch(out)
    return out


class ArrowSampleSink:
    """Produces sample batches to a topic with a ``confluent_kafka.Producer``, split so
    each message stays under ``max_message_bytes`` (librdkafka's default limit is 1 MB).
    Key = first sample_id. A stalled broker blocks rather than drops a batch."""

    def __init__(self, producer: Any, topic: str, max_message_bytes: int = 900_000,
                 stall_log_interval_s: float = 30.0) -> None:
        self._producer = BlockingProducer(producer, stall_log_interval_s)
        self._topic = topic
        self._max_bytes = max_message_bytes

    def send(self, batch: SampleBatch) -> int:
        """Produce ``batch``; returns the number of messages."""
        rows = len(batch["sample_id"])
        if rows == 0:
            return 0
        row_bytes = sum(a.nbytes for a in batch.values()) / rows
        per_message = max(1, int(self._max_bytes // (row_bytes * 1.2)))  # 20% for Arrow framing
        messages = 0
        for start in range(0, rows, per_message):
            part = slice_batch(batch, start, min(rows, start + per_message))
            self._producer.produce(self._topic, batch_to_ipc(part), key=str(int(part["sample_id"][0])).encode())
            messages += 1
        self._producer.poll()
        return messages

    def flush(self, timeout_s: float) -> int:
        """Wait for delivery; return how many messages are still undelivered."""
        return self._producer.flush(timeout_s)
