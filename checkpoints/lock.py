"""The one-writer lock of a store root: an exclusive, non-blocking ``flock``.

An ``flock`` rather than a pid file: the kernel drops it when its holder dies, even by
SIGKILL, so a crashed daemon never leaves a stale lock for an operator to delete.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import CheckpointLockedError

LOCK_FILE = ".lock"  # under the store root; never cleaned (it is not a leftover)


class WriterLock:
    """Holds ``flock(LOCK_EX)`` on ``path`` from construction until :meth:`release`.

    Raises :class:`CheckpointLockedError` at once (no waiting) if another process holds it.
    """

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CheckpointLockedError(f"{path.parent} is locked by another writer") from None
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Close the descriptor, which drops the lock. Idempotent: a second close could hit
        a descriptor number the process has since reused."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
