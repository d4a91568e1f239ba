"""Gate decisions: alarms freeze, auto/manual unfreeze, sticky operator freeze, actions, state."""

from __future__ import annotations

from typing import Any

import pytest

from monitors import Gate, GateConfig, GateState, Transition, Verdict


def verdict(monitor: str, alarm: bool, samples: int, ok: bool | None = None) -> Verdict:
    ok = not alarm if ok is None else ok
    return Verdict(monitor, samples // 1000, samples, True, ok, alarm, False, {}, "" if ok else f"{monitor} looks bad")


def gate(**config: Any) -> tuple[Gate, list[Transition]]:
    seen: list[Transition] = []
    return Gate(GateConfig(**config), on_transition=seen.append, clock=lambda: 1_700_000_000.0), seen


def test_alarm_freezes_and_auto_policy_reopens_when_every_alarm_cleared() -> None:
    g, seen = gate()
    assert g.observe(verdict("auc", False, 1000)) is None and g.publish_allowed()
    frozen = g.observe(verdict("auc", True, 2000))
    assert frozen == seen[0]
    assert (frozen.from_state, frozen.to_state, frozen.monitors, frozen.sample_count) == (
        GateState.OPEN, GateState.FROZEN, ("auc",), 2000,
    )
    assert frozen.reason == "auc: auc looks bad" and not frozen.manual and frozen.action == "hold"
    assert not g.publish_allowed() and g.should_consume()
    g.observe(verdict("label_ratio", True, 2000))
    assert g.observe(verdict("auc", False, 3000)) is None  # label_ratio still holds it
    opened = g.observe(verdict("label_ratio", False, 4000))
    assert opened is not None and opened.to_state is GateState.OPEN
    assert opened.monitors == ("auc", "label_ratio") and opened.reason == "alarms cleared"
    assert g.publish_allowed() and [t.seq for t in seen] == [1, 2]


def test_alarm_reason_is_the_first_bad_window_not_the_clearing_ones() -> None:
    g, _ = gate(unfreeze="manual")
    g.observe(verdict("auc", True, 1000))
    g.observe(verdict("auc", True, 2000, ok=True))  # still alarmed, window already good
    assert g.status()["alarms"] == {"auc": "auc looks bad"}


def test_manual_policy_waits_for_an_operator() -> None:
    g, seen = gate(unfreeze="manual")
    g.observe(verdict("feature_drift", True, 1000))
    assert g.observe(verdict("feature_drift", False, 5000)) is None
    assert g.state is GateState.FROZEN
    opened = g.unfreeze("on-call checked")
    assert opened is not None and opened.manual and opened.reason == "manual unfreeze: on-call checked"
    assert g.publish_allowed() and g.unfreeze("again") is None and len(seen) == 2


def test_manual_freeze_is_sticky_until_manual_unfreeze() -> None:
    g, seen = gate()
    frozen = g.freeze("bad deploy upstream")
    assert frozen is not None and frozen.manual and frozen.monitors == ()
    assert g.freeze("twice") is None
    g.observe(verdict("auc", True, 1000))
    g.observe(verdict("auc", False, 2000))  # alarms come and go: still frozen
    assert g.state is GateState.FROZEN and len(seen) == 1
    assert g.unfreeze("fixed") is not None and g.publish_allowed()


def test_manual_freeze_over_an_automatic_one_is_recorded_and_sticks() -> None:
    g, seen = gate()
    g.observe(verdict("auc", True, 1000))
    again = g.freeze("investigating")
    assert again is not None and (again.from_state, again.to_state) == (GateState.FROZEN, GateState.FROZEN)
    g.observe(verdict("auc", False, 2000))
    assert g.state is GateState.FROZEN and len(seen) == 2


def test_unfreeze_acknowledges_current_alarms_until_they_clear_and_return() -> None:
    g, _ = gate()
    g.observe(verdict("label_ratio", True, 1000))
    opened = g.unfreeze("the CTR jump is a marketing campaign")
    assert opened is not None and opened.monitors == ("label_ratio",) and "acknowledged" in opened.reason
    assert g.observe(verdict("label_ratio", True, 2000)) is None and g.publish_allowed()
    g.observe(verdict("label_ratio", False, 3000))
    refrozen = g.observe(verdict("label_ratio", True, 4000))
    assert refrozen is not None and refrozen.to_state is GateState.FROZEN


def test_only_monitors_in_freeze_on_can_freeze() -> None:
    g, seen = gate(freeze_on=("auc",))
    g.observe(verdict("feature_drift", True, 1000))
    assert g.publish_allowed() and seen == [] and g.status()["sample_count"] == 1000


def test_pause_stops_consumption_only_while_frozen() -> None:
    g, _ = gate(on_freeze="pause", unfreeze="manual")
    assert g.should_consume()
    g.freeze("maintenance")
    assert not g.should_consume() and not g.publish_allowed()
    g.unfreeze("done")
    assert g.should_consume()


def test_rollback_is_requested_once_per_freeze_until_acknowledged_or_reopened() -> None:
    g, _ = gate(on_freeze="rollback")
    g.observe(verdict("auc", True, 1000))
    assert g.rollback_requested and g.should_consume()
    g.ack_rollback()
    g.freeze("keep it frozen")  # already frozen: no second rollback
    assert not g.rollback_requested
    g.unfreeze("ok")
    g.observe(verdict("auc", False, 2000))
    g.observe(verdict("auc", True, 3000))
    assert g.rollback_requested
    g.observe(verdict("auc", False, 4000))
    assert not g.rollback_requested  # reopened before the publisher acted: nothing to roll back


@pytest.mark.parametrize("action", ["hold", "rollback"])
def test_state_round_trip_keeps_every_decision_input(action: str) -> None:
    g, _ = gate(on_freeze=action)
    g.observe(verdict("auc", True, 1000))
    g.observe(verdict("label_ratio", True, 1500))
    g.unfreeze("ack")
    g.freeze("manual")
    restored, seen = gate(on_freeze=action)
    restored.load_state_dict(g.state_dict())
    assert restored.status() == g.status()
    assert restored.last_transition == g.last_transition
    for other in (g, restored):
        other.observe(verdict("auc", False, 2000))
        other.unfreeze("done")
    assert restored.status() == g.status() and seen[-1].seq == 4
    with pytest.raises(ValueError, match="format"):
        restored.load_state_dict({**g.state_dict(), "format_version": 0})


def test_announce_reissues_a_restored_freeze_to_the_sinks() -> None:
    g, _ = gate()
    assert g.announce() is None  # OPEN: nothing to say
    g.observe(verdict("auc", True, 1000))
    restored, seen = gate()
    restored.load_state_dict(g.state_dict())
    again = restored.announce()
    assert again is not None and seen == [again]
    assert (again.from_state, again.to_state) == (GateState.FROZEN, GateState.FROZEN)
    assert again.monitors == ("auc",) and again.seq == 1  # the restored freeze's number: nothing new happened
    assert again.reason == "restored frozen: auc: auc looks bad" and not restored.rollback_requested
    # Announcing is not a transition: the state stays what was restored, however often a
    # restarted daemon announces (a recorded FROZEN -> FROZEN per restart made replays differ).
    restored.announce()
    assert restored.state_dict() == g.state_dict()
