"""What a monitor says about one window, and the hysteresis that turns windows into alarms."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class Verdict:
    """A monitor's judgement of one closed window.

    ``metrics`` keys are ``"<metric>"`` or ``"<metric>/<subject>"`` (``"auc/ctr"``,
    ``"psi/item.price"``) so an exporter can split them into a name and a label.
    A value is NaN when it cannot be computed on this window (e.g. AUC without positives).
    """

    monitor: str
    window: int  # 0-based index of the window over the monitor's life (rebaselining does not restart it)
    sample_count: int  # samples the monitor had seen when the window closed
    judged: bool  # False while warming up or when the window carried too little signal
    ok: bool  # the window looked healthy (always True when not judged)
    alarm: bool  # alarm state after this window, hysteresis applied
    warming_up: bool  # the reference is still being learnt
    metrics: Mapping[str, float] = field(default_factory=dict)
    reason: str = ""  # human-readable: what was bad, or why the window was not judged

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN becomes None)."""
        return {
            "monitor": self.monitor,
            "window": self.window,
            "sample_count": self.sample_count,
            "judged": self.judged,
            "ok": self.ok,
            "alarm": self.alarm,
            "warming_up": self.warming_up,
            "metrics": {k: (None if math.isnan(v) else v) for k, v in self.metrics.items()},
            "reason": self.reason,
        }


@dataclass
class Hysteresis:
    """Raise after ``alarm_after`` consecutive bad windows, clear after ``clear_after`` good ones.

    Windows that were not judged are not fed in: they neither raise nor clear.
    """

    alarm_after: int
    clear_after: int
    alarm: bool = False
    bad_streak: int = 0
    good_streak: int = 0

    def step(self, bad: bool) -> bool:
        """Account one judged window; return the alarm state after it."""
        if bad:
            self.bad_streak += 1
            self.good_streak = 0
            self.alarm = self.alarm or self.bad_streak >= self.alarm_after
        else:
            self.good_streak += 1
            self.bad_streak = 0
            self.alarm = self.alarm and self.good_streak < self.clear_after
        return self.alarm

    def state_dict(self) -> dict[str, Any]:
        return {"alarm": self.alarm, "bad_streak": self.bad_streak, "good_streak": self.good_streak}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alarm = bool(state["alarm"])
        self.bad_streak = int(state["bad_streak"])
        self.good_streak = int(state["good_streak"])
