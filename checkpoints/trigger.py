"""When to checkpoint: every N samples and/or every T seconds, with backoff after failures.

The daemon asks only between batches, so whatever this decides, the cut is a batch
boundary and the checkpoint's offsets match its state exactly (DESIGN.md §6.1). Wall time
only decides *whether* to cut at this boundary, never where a batch ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .config import CheckpointConfig


class CheckpointTrigger:
    """Call order per batch: ``record(n)`` after training it, then ``due()``; after a save
    attempt, ``saved()`` or ``failed()``.

    ``clock`` is monotonic seconds (``time.monotonic``): wall-clock jumps must neither
    trigger a burst of checkpoints nor suppress them.
    """

    def __init__(
        self,
        *,
        every_samples: int | None,
        every_seconds: float | None,
        backoff_seconds: float,
        backoff_max_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every_samples = every_samples
        self.every_seconds = every_seconds
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self._clock = clock
        self._last_save = clock()
        self._retry_at = float("-inf")
        self.samples_since_save = 0
        self.failures = 0  # consecutive failed saves

    @classmethod
    def from_config(cls, config: CheckpointConfig, clock: Callable[[], float] = time.monotonic) -> CheckpointTrigger:
        return cls(
            every_samples=config.every_samples,
            every_seconds=config.every_seconds,
            backoff_seconds=config.retry_backoff_seconds,
            backoff_max_seconds=config.retry_backoff_max_seconds,
            clock=clock,
        )

    def record(self, samples: int) -> None:
        """A batch of ``samples`` was trained."""
        self.samples_since_save += samples

    def due(self) -> bool:
        """Whether to checkpoint at this batch boundary.

        Never with nothing trained since the last save (an identical checkpoint is
        pointless), never while backing off after a failure.
        """
        if self.samples_since_save == 0:
            return False
        now = self._clock()
        if now < self._retry_at:
            return False
        by_samples = self.every_samples is not None and self.samples_since_save >= self.every_samples
        by_time = self.every_seconds is not None and now - self._last_save >= self.every_seconds
        return by_samples or by_time

    def saved(self) -> None:
        """A checkpoint was written: restart both cadences and forget past failures."""
        self._last_save = self._clock()
        self._retry_at = float("-inf")
        self.samples_since_save = 0
        self.failures = 0

    def failed(self) -> float:
        """A save failed: wait before the next attempt (doubling, capped). Returns the wait.

        The counters are kept, so the checkpoint is due again as soon as the wait is over.
        """
        self.failures += 1
        doublings = min(self.failures - 1, 64)  # a week-long outage must not overflow
        delay = min(self.backoff_seconds * 2.0**doublings, self.backoff_max_seconds)
        self._retry_at = self._clock() + delay
        return delay
