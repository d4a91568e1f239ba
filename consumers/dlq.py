"""Dead-letter records for rejected messages, and where they go.

A record is one JSON object::

    {"reason": "bad_ts", "detail": "...", "original": "<text or base64>",
     "original_encoding": "text" | "base64", "original_bytes": 1234, "original_truncated": false,
     "topic": "events", "partition": 3, "offset": 1017}

The message key is ``"<topic>:<partition>:<offset>"``: a replay after a crash may write a
record again (the DLQ is at-least-once), and the key makes such duplicates easy to drop.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, Protocol

import orjson

from consumers.produce import BlockingProducer
from consumers.reasons import Rejection


def dlq_record(rejection: Rejection, topic: str, max_original_bytes: int) -> bytes:
    original = rejection.original or b""
    kept = original[:max_original_bytes]
    try:
        text, encoding = kept.decode("utf-8"), "text"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(kept).decode("ascii"), "base64"
    return orjson.dumps({
        "reason": rejection.reason.value,
        "detail": rejection.detail,
        "original": text,
        "original_encoding": encoding,
        "original_bytes": len(original),
        "original_truncated": len(kept) < len(original),
        "topic": topic,
        "partition": rejection.partition,
        "offset": rejection.offset,
    })


def decode_original(record: dict[str, Any]) -> bytes:
    """The (possibly truncated) original bytes of a parsed DLQ record."""
    if record["original_encoding"] == "base64":
        return base64.b64decode(record["original"])
    return record["original"].encode("utf-8")


class DlqSink(Protocol):
    def send(self, rejections: Sequence[Rejection]) -> None: ...

    def flush(self, timeout_s: float) -> int:
        """Wait for delivery; return how many records are still undelivered."""


class KafkaDlqSink:
    """Produces DLQ records to a topic with a ``confluent_kafka.Producer``; a stalled
    broker blocks rather than drops a record."""

    def __init__(self, producer: Any, dlq_topic: str, source_topic: str, max_original_bytes: int = 65_536,
                 stall_log_interval_s: float = 30.0) -> None:
        self._producer = BlockingProducer(producer, stall_log_interval_s)
        self._dlq_topic = dlq_topic
        self._source_topic = source_topic
        self._max_original = max_original_bytes

    def send(self, rejections: Sequence[Rejection]) -> None:
        for r in rejections:
            key = f"{self._source_topic}:{r.partition}:{r.offset}".encode()
            self._producer.produce(self._dlq_topic, dlq_record(r, self._source_topic, self._max_original), key=key)
        self._producer.poll()

    def flush(self, timeout_s: float) -> int:
        return self._producer.flush(timeout_s)
