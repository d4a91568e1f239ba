"""Sample-count windows, warm-up, hysteresis and the state protocol shared by all monitors.

A monitor cuts the stream into windows of exactly ``window`` samples, whatever the batch
sizes (a batch that straddles a boundary is split), so its verdicts depend only on the
sample sequence: a replay with other batch boundaries gives the same verdicts.
The first ``warmup_windows`` windows learn the reference; after that each window is
judged against it, and :class:`~monitors.verdict.Hysteresis` turns bad windows into an alarm.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Mapping

from .batch import ScoredBatch
from .config import WindowedMonitorConfig
from .verdict import Hysteresis, Verdict

STATE_FORMAT_VERSION = 1


class IncompatibleStateError(ValueError):
    """The saved state was made with another format or window/bucket layout; start the monitor afresh."""


@dataclass(frozen=True)
class Assessment:
    """What a monitor's window close reports to the shared machinery."""

    metrics: dict[str, float]
    problems: list[str] = field(default_factory=list)  # non-empty: the window is bad
    judged: bool = True  # False: too little signal to say (does not move the hysteresis)
    note: str = ""  # reason shown when there is no problem


class WindowedMonitor(ABC):
    """Base class: feeds :meth:`_accumulate` with window-aligned chunks and closes windows.

    Subclass hooks, all called on the training thread:

    * ``_accumulate(chunk, learning)``: add a chunk (never crossing a window boundary) to the
      current window; ``learning`` is True while the reference is being learnt.
    * ``_close(learning, reference_complete)``: the window is full. While learning, fold it
      into the reference (and finish the reference when ``reference_complete``); otherwise
      compare it to the reference. Returns an :class:`Assessment`.
    * ``_adapt(metrics)``: the window was judged good while the monitor is clear; let the
      baseline follow it (never called on bad windows, so a drift is never learnt away).
    * ``_reset_window()`` / ``_reset_reference()``: drop window accumulators / the reference.
    * ``_state()`` / ``_load_state(state)`` / ``_layout()``: subclass state and the config
      values that the state's shapes depend on (checked on load).
    """

    def __init__(self, name: str, config: WindowedMonitorConfig) -> None:
        self.name = name
        self.config = config
        self._hysteresis = Hysteresis(config.alarm_after, config.clear_after)
        self._windows = 0  # windows closed since construction (monotonic, survives rebaseline)
        self._learnt = 0  # reference windows learnt since the last (re)baseline
        self._filled = 0  # samples in the current, open window
        self._samples = 0  # samples seen in total
        self.last_verdict: Verdict | None = None

    @property
    def alarm(self) -> bool:
        return self._hysteresis.alarm

    @property
    def warming_up(self) -> bool:
        return self._learnt < self.config.warmup_windows

    @property
    def samples(self) -> int:
        return self._samples

    def update(self, batch: ScoredBatch) -> list[Verdict]:
        """Feed one batch; return the verdicts of the windows it closed (usually 0 or 1)."""
        verdicts = []
        start, size = 0, len(batch)
        while start < size:
            stop = min(size, start + self.config.window - self._filled)
            self._accumulate(batch.rows(start, stop), learning=self.warming_up)
            self._filled += stop - start
            self._samples += stop - start
            start = stop
            if self._filled == self.config.window:
                verdicts.append(self._close_window())
        return verdicts

    def rebaseline(self) -> None:
        """Forget the reference and the alarm; the next windows learn a new reference.

        For a shift that is real and here to stay (the operator decides). The open window
        is dropped, since it was not collected for learning.
        """
        self._hysteresis = Hysteresis(self.config.alarm_after, self.config.clear_after)
        self._learnt = 0
        self._filled = 0
        self._reset_reference()
        self._reset_window()

    def _close_window(self) -> Verdict:
        learning = self.warming_up
        if learning:
            self._learnt += 1
        assessment = self._close(learning, reference_complete=learning and not self.warming_up)
        if learning:
            reason = f"learning the reference ({self._learnt}/{self.config.warmup_windows} windows)"
            judged = False
        else:
            judged = assessment.judged or bool(assessment.problems)
            if judged:
                self._hysteresis.step(bool(assessment.problems))
                if not assessment.problems and not self.alarm:
                    self._adapt(assessment.metrics)
            reason = "; ".join(assessment.problems) or assessment.note
        verdict = Verdict(
            monitor=self.name,
            window=self._windows,
            sample_count=self._samples,
            judged=judged,
            ok=not assessment.problems,
            alarm=self.alarm,
            warming_up=learning,
            metrics=assessment.metrics,
            reason=reason,
        )
        self._windows += 1
        self._filled = 0
        self._reset_window()
        self.last_verdict = verdict
        return verdict

    def state_dict(self) -> dict[str, Any]:
        """A copy of everything needed to continue with identical verdicts."""
        return {
            "format_version": STATE_FORMAT_VERSION,
            "layout": self._full_layout(),
            "windows": self._windows,
            "learnt": self._learnt,
            "filled": self._filled,
            "samples": self._samples,
            "hysteresis": self._hysteresis.state_dict(),
            "data": self._state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format_version") != STATE_FORMAT_VERSION:
            raise IncompatibleStateError(
                f"{self.name}: state format {state.get('format_version')!r}, this code reads {STATE_FORMAT_VERSION}"
            )
        if dict(state["layout"]) != self._full_layout():
            raise IncompatibleStateError(
                f"{self.name}: state was saved with {dict(state['layout'])}, config now gives {self._full_layout()}"
            )
        self._windows = int(state["windows"])
        self._learnt = int(state["learnt"])
        self._filled = int(state["filled"])
        self._samples = int(state["samples"])
        self._hysteresis.load_state_dict(state["hysteresis"])
        self._load_state(state["data"])
        self.last_verdict = None

    def _full_layout(self) -> dict[str, Any]:
        return {"window": self.config.window, "warmup_windows": self.config.warmup_windows, **self._layout()}

    def _layout(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def _accumulate(self, chunk: ScoredBatch, learning: bool) -> None: ...

    @abstractmethod
    def _close(self, learning: bool, reference_complete: bool) -> Assessment: ...

    @abstractmethod
    def _adapt(self, metrics: Mapping[str, float]) -> None: ...

    @abstractmethod
    def _reset_window(self) -> None: ...

    @abstractmethod
    def _reset_reference(self) -> None: ...

    @abstractmethod
    def _state(self) -> dict[str, Any]: ...

    @abstractmethod
    def _load_state(self, state: Mapping[str, Any]) -> None: ...
