"""Which checkpoints and daily pointers to delete: a pure function of names and dates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date


@dataclass(frozen=True)
class RetentionPlan:
    delete: tuple[str, ...]  # checkpoint names, oldest first
    expired_days: tuple[date, ...]  # daily pointers that fell out of the window


def plan_retention(
    names: Sequence[str],
    *,
    latest: str | None,
    daily: Mapping[date, str],
    today: date,
    keep_last: int,
    keep_daily: int,
) -> RetentionPlan:
    """Keep the newest ``keep_last`` checkpoints, ``latest``, and the target of every daily
    pointer dated within the last ``keep_daily`` days (today counts as one).

    ``names`` must be sorted oldest first (checkpoint names sort by step). A pointer dated
    after ``today`` (the wall clock went backwards) counts as inside the window: a clock
    glitch must never delete a warm-start point.
    """
    in_window = {day: name for day, name in daily.items() if (today - day).days < keep_daily}
    keep = set(names[max(len(names) - keep_last, 0) :]) | set(in_window.values())
    if latest is not None:
        keep.add(latest)
    return RetentionPlan(
        delete=tuple(n for n in names if n not in keep),
        expired_days=tuple(sorted(day for day in daily if day not in in_window)),
    )
