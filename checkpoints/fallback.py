"""The order ``load()`` tries checkpoints in: a pure function of the names and ``LATEST``.

``LATEST``'s target comes first even when a newer directory exists: a complete directory
that ``LATEST`` never reached is a save that crashed before its commit point. Then every
other checkpoint, newest first, so a damaged ``LATEST`` costs as little training as possible.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .errors import Skipped
from .manifest import LATEST_FILE


@dataclass(frozen=True)
class LoadOrder:
    candidates: tuple[str, ...]  # checkpoint names, in the order to try them
    skipped: tuple[Skipped, ...]  # what is wrong with LATEST itself (missing, dangling), if anything


def plan_load_order(names: Collection[str], latest: str | None) -> LoadOrder:
    """Candidates for ``load()``: ``latest`` if it names one of ``names``, then the rest newest
    first (checkpoint names sort by step). A missing ``LATEST`` beside existing checkpoints,
    or one naming no checkpoint here, is reported as skipped."""
    skipped = []
    if latest is None:
        if names:
            skipped.append(Skipped(LATEST_FILE, "missing"))
    elif latest not in names:
        skipped.append(Skipped(LATEST_FILE, f"names {latest!r}, which is not a checkpoint here"))
    candidates = sorted(names, reverse=True)
    if latest in names:
        candidates.remove(latest)
        candidates.insert(0, latest)
    return LoadOrder(tuple(candidates), tuple(skipped))
