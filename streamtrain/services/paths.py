"""Where embedded services keep binaries and logs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$STREAMTRAIN_CACHE`` or ``$XDG_CACHE_HOME/streamtrain`` or ``~/.cache/streamtrain``."""
    explicit = os.environ.get("STREAMTRAIN_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamtrain"
