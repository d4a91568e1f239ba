"""Exceptions raised by the checkpoint store.

The daemon needs to tell three situations apart, so each has its own type:

* a save failed (disk full, read-only disk...): alert, keep training, retry later
  -> :class:`CheckpointWriteError`;
* there is nothing to resume from (first start) -> :class:`CheckpointNotFoundError`;
* checkpoints exist but none is intact: an operator must look
  -> :class:`NoIntactCheckpointError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class CheckpointError(Exception):
    """Base class of every error raised by :mod:`checkpoints`."""


class CheckpointWriteError(CheckpointError):
    """A save did not complete. The previous checkpoint is untouched and still loadable.

    ``errno`` is the operating-system error number when one is known (``ENOSPC``,
    ``EACCES``, ``EROFS`` ...), so the caller can say *why* in its alert.
    If the failure came after the new checkpoint directory was renamed into place
    (only fsync of the root or the ``LATEST`` replace can fail there), the new checkpoint
    may already be ``LATEST``; either way the store is consistent and loadable.
    """

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class CheckpointNotFoundError(CheckpointError):
    """No checkpoint of that name (or no checkpoint at all) under the root."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint failed verification (missing file, wrong size, sha256 mismatch ...)."""

    def __init__(self, name: str, problems: Sequence[str]) -> None:
        super().__init__(f"{name}: " + "; ".join(problems))
        self.name = name
        self.problems = tuple(problems)


@dataclass(frozen=True)
class Skipped:
    """A checkpoint passed over while looking for the newest intact one, and why."""

    name: str
    reason: str


class NoIntactCheckpointError(CheckpointError):
    """Checkpoints exist but every one of them failed verification."""

    def __init__(self, skipped: Sequence[Skipped]) -> None:
        lines = "; ".join(f"{s.name}: {s.reason}" for s in skipped)
        super().__init__(f"no intact checkpoint ({lines})")
        self.skipped = tuple(skipped)


class CheckpointLockedError(CheckpointError):
    """Another writer (a running daemon, a rollback) holds the store's lock."""
