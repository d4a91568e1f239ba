"""End-of-input markers: how a finite log (a replay, a test, a bounded simulation) ends.

A producer that knows its log is complete writes one marker into every partition: a
message with a null value and the header ``streamtrain-control: end-of-input``. A marker
is not an event (never dead-lettered, never counted as a message); the consumer records
that the partition has ended. Once every assigned partition has ended, the pipeline
releases every pending sample (the joiner's flush) and the daemon trains what is left,
checkpoints and exits — the same final state however the run was interrupted, because
where each partition ends is a fixed offset, not a moment.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

END_OF_INPUT_HEADER: Final = "streamtrain-control"
END_OF_INPUT: Final = b"end-of-input"


def is_end_of_input(value: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None) -> bool:
    """Is this message an end-of-input marker? (Only null-valued messages are looked at.)"""
    return not value and any(k == END_OF_INPUT_HEADER and v == END_OF_INPUT for k, v in headers or ())


def produce_end_of_input(producer: Any, topic: str, partitions: Iterable[int]) -> None:
    """Write one marker into each partition (a ``confluent_kafka.Producer``; flush after)."""
    for partition in partitions:
        producer.produce(topic, value=None, partition=partition, headers=[(END_OF_INPUT_HEADER, END_OF_INPUT)])
