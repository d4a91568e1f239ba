"""A log line for a recurring condition (broker stall, full queue) at most once per interval."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any


class RateLimitedLog:
    """Log a recurring condition at most once per interval, with the count suppressed."""

    def __init__(self, interval_s: float, clock: Callable[[], float], logger: logging.Logger) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, message: str, *args: Any, extra: dict[str, Any] | None = None) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return
        suffix = f" ({self._suppressed} similar suppressed)" if self._suppressed else ""
        self._log.warning(message + suffix, *args, extra=extra)
        self._last = now
        self._suppressed = 0
