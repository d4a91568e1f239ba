"""What a warm-start spec asks for, and which daily pointers to try: no disk access.

A spec is ``"daily"`` (the newest daily pointer whose target is intact), ``"daily:YYYY-MM-DD"``
(that day's pointer, no fallback), a checkpoint name in this store, or a path: a checkpoint
directory or another store's root. The store probes the disk to tell a name from a path
and a checkpoint directory from a store root; everything decided by text alone is here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from .errors import CheckpointNotFoundError
from .manifest import parse_step


@dataclass(frozen=True)
class FromDaily:
    # The day as written after "daily:" (parsed by daily_pointer, once the pointers are
    # read); None for the newest pointer whose target is intact.
    day: str | None


@dataclass(frozen=True)
class FromLocation:
    name: str | None  # the spec, if it is a checkpoint name: tried in this store first
    path: Path  # otherwise (or if this store has no such checkpoint): a directory or a root


def parse_warm_start(spec: str) -> FromDaily | FromLocation:
    if spec == "daily" or spec.startswith("daily:"):
        return FromDaily(spec.partition(":")[2] or None)  # "daily:" means plain "daily"
    return FromLocation(spec if parse_step(spec) is not None else None, Path(spec))


def daily_pointer(pointers: Mapping[date, str], day: str) -> str:
    """The checkpoint named by the pointer of ``day`` (ISO date; ``ValueError`` if it is not
    one). Raises :class:`CheckpointNotFoundError` when that day has no pointer."""
    wanted = date.fromisoformat(day)
    if wanted not in pointers:
        raise CheckpointNotFoundError(f"no daily pointer for {day}")
    return pointers[wanted]


def daily_fallback_order(pointers: Mapping[date, str]) -> list[tuple[date, str]]:
    """(day, checkpoint name) newest day first: a plain ``daily`` warm start takes the first
    whose target is intact, so a damaged checkpoint costs one day, not the warm start."""
    return sorted(pointers.items(), reverse=True)
