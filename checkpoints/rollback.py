"""What a rollback changes besides ``LATEST``: a pure function of names and daily pointers.

Every checkpoint newer than the target moves to ``rolled-back/`` (training resumes from
the target and will reuse their step numbers), and every daily pointer naming one of them
is dropped (it would name a checkpoint that is no longer in the root).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date


@dataclass(frozen=True)
class RollbackPlan:
    move: tuple[str, ...]  # checkpoints newer than the target, oldest first
    drop_days: tuple[date, ...]  # daily pointers naming one of them, oldest first


def plan_rollback(target: str, names: Sequence[str], daily: Mapping[date, str]) -> RollbackPlan:
    """``names`` sorted oldest first, as :func:`~checkpoints.retention.plan_retention` takes them."""
    move = tuple(n for n in names if n > target)  # fixed-width names sort by step
    moving = set(move)
    return RollbackPlan(move, tuple(sorted(day for day, name in daily.items() if name in moving)))
