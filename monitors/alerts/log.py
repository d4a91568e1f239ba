"""Log sink: every transition and every bad window, as stdlib log records with structured ``extra``."""

from __future__ import annotations

import logging

from ..gate import GateState, Transition
from ..verdict import Verdict


class LogSink:
    """Freezes log at WARNING, reopenings at INFO; bad or alarmed windows at WARNING, others at DEBUG.

    Records carry ``extra={"transition": {...}}`` / ``extra={"verdict": {...}}`` (JSON-able)
    for structured log handlers.
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("monitors.gate")

    def on_verdict(self, verdict: Verdict) -> None:
        level = logging.WARNING if (not verdict.ok or verdict.alarm) else logging.DEBUG
        if self._logger.isEnabledFor(level):
            state = "ALARM" if verdict.alarm else ("bad" if not verdict.ok else "ok")
            self._logger.log(
                level,
                "monitor %s window %d at sample %d: %s%s",
                verdict.monitor,
                verdict.window,
                verdict.sample_count,
                state,
                f" ({verdict.reason})" if verdict.reason else "",
                extra={"verdict": verdict.to_dict()},
            )

    def on_transition(self, transition: Transition) -> None:
        level = logging.WARNING if transition.to_state is GateState.FROZEN else logging.INFO
        self._logger.log(
            level,
            "gate %s -> %s at sample %d (action %s): %s",
            transition.from_state.value.upper(),
            transition.to_state.value.upper(),
            transition.sample_count,
            transition.action,
            transition.reason,
            extra={"transition": transition.to_dict()},
        )

    def close(self, timeout: float) -> bool:
        return True
