"""The publication gate: OPEN or FROZEN, driven by monitor alarms and by the operator.

* An alarm from a monitor listed in ``GateConfig.freeze_on`` freezes an OPEN gate.
* ``unfreeze="auto"``: the gate reopens once every such alarm has cleared;
  ``unfreeze="manual"``: it stays FROZEN until :meth:`Gate.unfreeze`.
* :meth:`Gate.freeze` (operator) is sticky: only :meth:`Gate.unfreeze` lifts it.
* :meth:`Gate.unfreeze` acknowledges the alarms active at that moment: they no longer
  hold the gate, but a monitor that clears and alarms again freezes it again.

The gate decides; others act: the publisher checks :meth:`publish_allowed` (the only
predicate for publishing) and :attr:`rollback_requested`, the daemon checks
:meth:`should_consume`. Decisions use sample counts only; the injected clock stamps
transition records for humans and alerts.
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .config import GateConfig
from .verdict import Verdict

GATE_FORMAT_VERSION = 1


class GateState(str, enum.Enum):
    OPEN = "open"
    FROZEN = "frozen"


@dataclass(frozen=True)
class Transition:
    """One change of the gate (or of why it is frozen: auto -> manual is FROZEN -> FROZEN)."""

    seq: int  # 1, 2, ... over the gate's life (kept in its state)
    from_state: GateState
    to_state: GateState
    reason: str
    sample_count: int  # samples seen by the monitors when it happened
    monitors: tuple[str, ...]  # the alarms that froze it, or that cleared / were acknowledged to open it
    manual: bool  # requested by an operator
    action: str  # configured reaction while frozen: hold | pause | rollback
    wall_time: float  # clock() at the transition: for alert timestamps only, never for decisions

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "from": self.from_state.value,
            "to": self.to_state.value,
            "reason": self.reason,
            "sample_count": self.sample_count,
            "monitors": list(self.monitors),
            "manual": self.manual,
            "action": self.action,
            "wall_time": self.wall_time,
        }


class Gate:
    """Publication gate. ``on_transition`` is called synchronously with every :class:`Transition`
    (on the caller's thread: the training thread or the control endpoint's); it must not block.

    Thread-safe: the training thread feeds verdicts while the control endpoint may freeze,
    unfreeze or read the status; one lock serialises them.
    """

    def __init__(
        self,
        config: GateConfig,
        on_transition: Callable[[Transition], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._on_transition = on_transition
        self._clock = clock
        self._lock = threading.RLock()
        self._state = GateState.OPEN
        self._manual = False  # an operator froze it: sticky until unfreeze()
        self._alarms: dict[str, str] = {}  # freezing monitors now in alarm -> reason of their first bad window
        self._acknowledged: set[str] = set()  # alarms an operator unfroze over
        self._involved: set[str] = set()  # monitors that froze (or kept frozen) the current freeze
        self._rollback = False
        self._samples = 0
        self._seq = 0
        self.last_transition: Transition | None = None

    @property
    def state(self) -> GateState:
        return self._state

    def publish_allowed(self) -> bool:
        """The one predicate the publisher checks before releasing a model version."""
        return self._state is GateState.OPEN

    def should_consume(self) -> bool:
        """False only while frozen with ``on_freeze="pause"``: the daemon stops fetching."""
        return not (self._state is GateState.FROZEN and self.config.on_freeze == "pause")

    @property
    def rollback_requested(self) -> bool:
        """True from a freeze with ``on_freeze="rollback"`` until :meth:`ack_rollback` or reopening.
        The publisher re-publishes the last good version (idempotent), then acknowledges."""
        return self._rollback

    def ack_rollback(self) -> None:
        with self._lock:
            self._rollback = False

    def observe(self, verdict: Verdict) -> Transition | None:
        """Account one monitor verdict (in sample order); return the transition it caused, if any."""
        with self._lock:
            self._samples = max(self._samples, verdict.sample_count)
            name = verdict.monitor
            if name not in self.config.freeze_on:
                return None
            if verdict.alarm:
                if name not in self._alarms or not verdict.ok:
                    self._alarms[name] = verdict.reason
            else:
                self._alarms.pop(name, None)
                self._acknowledged.discard(name)
            blocking = sorted(set(self._alarms) - self._acknowledged)
            if self._state is GateState.FROZEN:
                self._involved.update(blocking)
                if not blocking and not self._manual and self.config.unfreeze == "auto":
                    return self._move(GateState.OPEN, "alarms cleared", tuple(sorted(self._involved)), manual=False)
                return None
            if blocking:
                self._involved = set(blocking)
                reason = "; ".join(f"{m}: {self._alarms[m]}" for m in blocking)
                return self._move(GateState.FROZEN, reason, tuple(blocking), manual=False)
            return None

    def freeze(self, reason: str) -> Transition | None:
        """Operator freeze, sticky until :meth:`unfreeze`. None if already manually frozen."""
        with self._lock:
            if self._manual:
                return None
            self._manual = True
            return self._move(GateState.FROZEN, f"manual freeze: {reason}", (), manual=True)

    def unfreeze(self, reason: str) -> Transition | None:
        """Operator unfreeze: lifts a manual freeze and acknowledges the current alarms.
        None if the gate is already OPEN."""
        with self._lock:
            if self._state is GateState.OPEN:
                return None
            self._manual = False
            self._acknowledged = set(self._alarms)
            acknowledged = tuple(sorted(self._acknowledged))
            suffix = f" (acknowledged alarms: {', '.join(acknowledged)})" if acknowledged else ""
            return self._move(GateState.OPEN, f"manual unfreeze: {reason}{suffix}", acknowledged, manual=True)

    def announce(self) -> Transition | None:
        """Re-issue a restored freeze to the sinks, as a FROZEN -> FROZEN transition.

        Call once after :meth:`load_state_dict` when the sinks are up: what lives outside
        the checkpoint (Alertmanager's firing alerts) then matches the restored state. The
        announcement is not a change of the gate: it is sent, not recorded (``seq`` and
        ``last_transition`` stay as restored), so a restart leaves the gate's state exactly
        as the uninterrupted run has it. None (nothing sent) when the gate is OPEN."""
        with self._lock:
            if self._state is GateState.OPEN:
                return None
            previous = "" if self.last_transition is None else f": {self.last_transition.reason}"
            announcement = Transition(
                seq=self._seq,
                from_state=GateState.FROZEN,
                to_state=GateState.FROZEN,
                reason=f"restored frozen{previous}",
                sample_count=self._samples,
                monitors=tuple(sorted(self._involved)),
                manual=self._manual,
                action=self.config.on_freeze,
                wall_time=self._clock(),
            )
            if self._on_transition is not None:
                self._on_transition(announcement)
            return announcement

    def _move(self, to: GateState, reason: str, monitors: tuple[str, ...], manual: bool) -> Transition:
        self._seq += 1
        transition = Transition(
            seq=self._seq,
            from_state=self._state,
            to_state=to,
            reason=reason,
            sample_count=self._samples,
            monitors=monitors,
            manual=manual,
            action=self.config.on_freeze,
            wall_time=self._clock(),
        )
        if to is GateState.OPEN:
            self._rollback = False
            self._involved = set()
        elif self._state is GateState.OPEN and self.config.on_freeze == "rollback":
            self._rollback = True
        self._state = to
        self.last_transition = transition
        if self._on_transition is not None:
            self._on_transition(transition)
        return transition

    def status(self) -> dict[str, Any]:
        """JSON-able summary for ``GET /status``."""
        with self._lock:
            return {
                "state": self._state.value,
                "publish_allowed": self.publish_allowed(),
                "should_consume": self.should_consume(),
                "manual_freeze": self._manual,
                "on_freeze": self.config.on_freeze,
                "unfreeze": self.config.unfreeze,
                "rollback_requested": self._rollback,
                "alarms": dict(sorted(self._alarms.items())),
                "acknowledged": sorted(self._acknowledged),
                "sample_count": self._samples,
                "last_transition": None if self.last_transition is None else self.last_transition.to_dict(),
            }

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {
                "format_version": GATE_FORMAT_VERSION,
                "state": self._state.value,
                "manual": self._manual,
                "alarms": dict(self._alarms),
                "acknowledged": sorted(self._acknowledged),
                "involved": sorted(self._involved),
                "rollback": self._rollback,
                "samples": self._samples,
                "seq": self._seq,
                "last_transition": None if self.last_transition is None else self.last_transition.to_dict(),
            }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            if state.get("format_version") != GATE_FORMAT_VERSION:
                raise ValueError(f"gate state format {state.get('format_version')!r}, expected {GATE_FORMAT_VERSION}")
            self._state = GateState(state["state"])
            self._manual = bool(state["manual"])
            self._alarms = {str(k): str(v) for k, v in state["alarms"].items()}
            self._acknowledged = set(state["acknowledged"])
            self._involved = set(state["involved"])
            self._rollback = bool(state["rollback"])
            self._samples = int(state["samples"])
            self._seq = int(state["seq"])
            last = state["last_transition"]
            self.last_transition = None if last is None else _transition_from_dict(last)


def _transition_from_dict(d: Mapping[str, Any]) -> Transition:
    return Transition(
        seq=int(d["seq"]),
        from_state=GateState(d["from"]),
        to_state=GateState(d["to"]),
        reason=str(d["reason"]),
        sample_count=int(d["sample_count"]),
        monitors=tuple(d["monitors"]),
        manual=bool(d["manual"]),
        action=str(d["action"]),
        wall_time=float(d["wall_time"]),
    )
