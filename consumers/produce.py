"""Producing without ever dropping a record: a full local queue means the broker is slow
or stalled, so wait for it (serving delivery callbacks) and log once per interval."""

from __future__ import annotations

import logging
import time
from typing import Any

from consumers.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


class BlockingProducer:
    """Wraps a ``confluent_kafka.Producer``: ``produce`` blocks while the queue is full."""

    def __init__(self, producer: Any, stall_log_interval_s: float = 30.0) -> None:
        self._producer = producer
        self._stalled = RateLimitedLog(stall_log_interval_s, time.monotonic, log)

    def produce(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        while True:
            try:
                self._producer.produce(topic, value=value, key=key)
                return
            except BufferError:
                self._stalled.warning("producer queue for %s full, waiting for the broker", topic)
                self._producer.poll(0.1)

    def poll(self) -> None:
        """Serve delivery callbacks without waiting."""
        self._producer.poll(0)

    def flush(self, timeout_s: float) -> int:
        """Wait for delivery; return how many messages are still undelivered."""
        return int(self._producer.flush(timeout_s))
