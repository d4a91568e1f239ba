"""Checkpoint policies: retention, daily pointers, rollback, warm start, ledger, trigger, CLI views."""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import numpy as np
import orjson
import pytest
from pydantic import ValidationError
from test_checkpoints import FAST, FakeClock, assert_checkpoint_is, make_components, save_step

from checkpoints import (
    CheckpointConfig,
    CheckpointCorruptError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointStore,
    CheckpointTrigger,
    checkpoint_name,
    ledger_chain,
)
from checkpoints.cli_support import inspect_checkpoint, list_checkpoints, rollback_checkpoint, verify_checkpoints
from checkpoints.retention import plan_retention

DAY = 86_400.0


def _names(*steps: int) -> list[str]:
    return [checkpoint_name(s) for s in steps]


def _store(root: Path, clock: FakeClock | None = None, **overrides: object) -> CheckpointStore:
    return CheckpointStore(root, FAST.model_copy(update=overrides), clock=clock or FakeClock())


# ------------------------------------------------------------------ retention


def test_retention_plan_keeps_last_latest_and_daily_window() -> None:
    names = _names(1, 2, 3, 4, 5, 6)
    daily = {date(2024, 3, 1): names[0], date(2024, 3, 2): names[1], date(2024, 3, 4): names[2]}
    plan = plan_retention(names, latest=names[3], daily=daily, today=date(2024, 3, 4), keep_last=2, keep_daily=2)
    assert plan.delete == tuple(_names(1, 2))  # 3 is today's daily, 4 is LATEST, 5-6 are the last two
    assert plan.expired_days == (date(2024, 3, 1), date(2024, 3, 2))  # window: 03-03, 03-04


def test_retention_never_expires_a_pointer_from_the_future() -> None:
    daily = {date(2024, 3, 9): checkpoint_name(1)}  # the wall clock went backwards
    plan = plan_retention(_names(1, 2), latest=None, daily=daily, today=date(2024, 3, 4), keep_last=1, keep_daily=1)
    assert plan == type(plan)(delete=(), expired_days=())


def test_retention_and_daily_pointers_over_ten_days(tmp_path: Path) -> None:
    clock = FakeClock("2024-03-01T00:30:00")
    with _store(tmp_path / "ckpt", clock, keep_last=2, keep_daily=3) as store:
        step = 0
        for _day in range(10):  # three saves a day, the first at 00:30 UTC
            for _ in range(3):
                step += 1
                save_step(store, step)
                clock.advance(8 * 3600)
        # Days 8, 9, 10 (2024-03-08..10) are in the window; their first saves are 22, 25, 28.
        assert store.daily_pointers() == {
            date(2024, 3, 8): checkpoint_name(22),
            date(2024, 3, 9): checkpoint_name(25),
            date(2024, 3, 10): checkpoint_name(28),
        }
        assert [s.name for s in store.list_checkpoints()] == _names(22, 25, 28, 29, 30)
        assert store.latest_pointer() == checkpoint_name(30)


def test_retention_never_deletes_latest(tmp_path: Path) -> None:
    with _store(tmp_path / "ckpt", keep_last=3) as store:
        for step in (1, 2, 3):
            save_step(store, step)
        (store.root / "LATEST").write_text(checkpoint_name(1))  # 2, 3 renamed in, never committed
    with _store(tmp_path / "ckpt", keep_last=1) as store:
        assert store.apply_retention() == (checkpoint_name(2),)
        assert_checkpoint_is(store, None, 1)


def test_daily_pointer_is_the_first_checkpoint_of_the_utc_day(tmp_path: Path) -> None:
    clock = FakeClock("2024-03-01T23:59:00")
    with _store(tmp_path / "ckpt", clock, keep_daily=7) as store:
        save_step(store, 1)
        clock.advance(30)
        save_step(store, 2)
        clock.advance(60)  # 2024-03-02 00:00:30 UTC
        save_step(store, 3)
        save_step(store, 4)
        assert store.daily_pointers() == {date(2024, 3, 1): checkpoint_name(1), date(2024, 3, 2): checkpoint_name(3)}
        assert (store.root / "daily" / "2024-03-02").read_text() == "ckpt-000000000003\n"


# ------------------------------------------------------------------- rollback


def test_rollback_moves_newer_checkpoints_aside(tmp_path: Path) -> None:
    clock = FakeClock("2024-03-01T12:00:00")
    with _store(tmp_path / "ckpt", clock, keep_daily=7) as store:
        save_step(store, 1)
        save_step(store, 2)
        clock.advance(DAY)
        save_step(store, 3)  # daily pointer of 2024-03-02
        save_step(store, 4)

        result = store.rollback(checkpoint_name(2))
        assert (result.latest, result.previous, result.moved) == (
            checkpoint_name(2),
            checkpoint_name(4),
            tuple(_names(3, 4)),
        )
        assert result.moved_to is not None and sorted(os.listdir(result.moved_to)) == _names(3, 4)
        assert result.moved_to.parent == store.root / "rolled-back"
        assert [s.name for s in store.list_checkpoints()] == _names(1, 2)
        assert store.daily_pointers() == {date(2024, 3, 1): checkpoint_name(1)}  # 03-02 named a moved one
        assert_checkpoint_is(store, None, 2)

        # Training resumes from 2 and reuses step numbers 3, 4 without colliding.
        info = store.save(3, make_components(30), offsets={}, watermark=None, config_hash="cfg")
        assert info.manifest.parent == checkpoint_name(2)
        assert store.daily_pointers()[date(2024, 3, 2)] == checkpoint_name(3)


def test_rollback_refuses_a_damaged_or_unknown_target(tmp_path: Path) -> None:
    with _store(tmp_path / "ckpt") as store:
        save_step(store, 1)
        save_step(store, 2)
        (store.root / checkpoint_name(1) / "dense.json").write_text("{}")
        with pytest.raises(CheckpointCorruptError, match=r"dense\.json"):
            store.rollback(checkpoint_name(1))
        with pytest.raises(CheckpointNotFoundError):
            store.rollback("ckpt-000000000099")
        assert store.latest_pointer() == checkpoint_name(2)


# ----------------------------------------------------------------- warm start


def test_warm_start_from_daily_name_and_paths(tmp_path: Path) -> None:
    clock = FakeClock("2024-03-01T12:00:00")
    with _store(tmp_path / "ckpt", clock, keep_daily=7) as store:
        for step in (1, 2):
            save_step(store, step)
            clock.advance(DAY)
        save_step(store, 3)  # 2024-03-03's pointer
        assert store.resolve_warm_start("daily").name == checkpoint_name(3)
        assert store.resolve_warm_start("daily:2024-03-02").name == checkpoint_name(2)
        assert store.resolve_warm_start(checkpoint_name(1)).name == checkpoint_name(1)
        assert store.resolve_warm_start(str(store.root / checkpoint_name(2))).name == checkpoint_name(2)

        with _store(tmp_path / "other", clock) as other:
            save_step(other, 7)
            assert store.resolve_warm_start(str(other.root)).name == checkpoint_name(7)

        (store.root / checkpoint_name(3) / "MANIFEST.json").unlink()
        fallback = store.resolve_warm_start("daily")
        assert fallback.name == checkpoint_name(2)
        assert fallback.skipped[0].name == "daily/2024-03-03"
        with pytest.raises(CheckpointNotFoundError):
            store.resolve_warm_start("daily:2024-02-01")
        with pytest.raises(CheckpointNotFoundError):
            store.resolve_warm_start(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------- ledger


def test_ledger_chain_follows_parents_across_a_rollback(tmp_path: Path) -> None:
    with _store(tmp_path / "ckpt") as store:
        for step in (1, 2, 3):
            save_step(store, step)  # ledger of step s: ids 10s .. 10s+9
        store.rollback(checkpoint_name(2))
        save_step(store, 3)
        save_step(store, 4)
    chain = ledger_chain(tmp_path / "ckpt")
    assert [link.name for link in chain.links] == _names(1, 2, 3, 4)
    assert chain.truncated_at is None
    np.testing.assert_array_equal(chain.sample_ids(), np.arange(10, 50))


def test_ledger_chain_reports_where_retention_cut_it(tmp_path: Path) -> None:
    with _store(tmp_path / "ckpt", keep_last=2) as store:
        for step in (1, 2, 3):
            save_step(store, step)
    chain = ledger_chain(tmp_path / "ckpt")
    assert [link.step for link in chain.links] == [2, 3] and chain.truncated_at == checkpoint_name(1)


# -------------------------------------------------------------------- trigger


class MonotonicClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_trigger_every_samples_at_batch_boundaries() -> None:
    trig = CheckpointTrigger(every_samples=100, every_seconds=None, backoff_seconds=1, backoff_max_seconds=1)
    due = []
    for _ in range(7):
        trig.record(40)
        due.append(trig.due())
        if due[-1]:
            trig.saved()
    assert due == [False, False, True, False, False, True, False]  # cut at 120, then at 120 again


def test_trigger_every_seconds_needs_trained_samples() -> None:
    clock = MonotonicClock()
    trig = CheckpointTrigger(
        every_samples=None, every_seconds=60, backoff_seconds=1, backoff_max_seconds=1, clock=clock
    )
    clock.now += 61
    assert not trig.due()  # nothing trained since the last save: nothing to save
    trig.record(1)
    assert trig.due()
    trig.saved()
    trig.record(1)
    clock.now += 59
    assert not trig.due()
    clock.now += 1
    assert trig.due()


def test_trigger_backs_off_after_failures_then_resets() -> None:
    clock = MonotonicClock()
    config = CheckpointConfig(every_samples=10, retry_backoff_seconds=5, retry_backoff_max_seconds=12)
    trig = CheckpointTrigger.from_config(config, clock=clock)
    trig.record(10)
    assert trig.due()
    assert [trig.failed(), trig.failed(), trig.failed()] == [5, 10, 12]
    clock.now += 11
    assert not trig.due()
    clock.now += 1
    assert trig.due() and trig.failures == 3
    trig.saved()
    assert (trig.failures, trig.samples_since_save, trig.failed()) == (0, 0, 5)


def test_config_is_frozen_and_strict() -> None:
    config = CheckpointConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.keep_last = 3  # type: ignore[misc]
    with pytest.raises(ValidationError, match="keep_lats"):
        CheckpointConfig(keep_lats=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="retry_backoff_max_seconds"):
        CheckpointConfig(retry_backoff_seconds=10, retry_backoff_max_seconds=5)


# ------------------------------------------------------------------ CLI views


def test_cli_views_are_json_and_tell_the_truth(tmp_path: Path) -> None:
    clock = FakeClock("2024-03-01T12:00:00")
    root = tmp_path / "ckpt"
    with _store(root, clock, keep_daily=7) as store:
        save_step(store, 1)
        save_step(store, 2)

    listing = list_checkpoints(root)
    orjson.dumps(listing)
    assert listing["latest"] == checkpoint_name(2) and listing["daily"] == {"2024-03-01": checkpoint_name(1)}
    first, second = listing["checkpoints"]
    assert (first["daily"], first["is_latest"], second["is_latest"], second["parent"]) == (
        ["2024-03-01"],
        False,
        True,
        checkpoint_name(1),
    )
    assert second["offsets"] == {"events": {"0": 2}} and second["watermark"] == 2000
    assert second["time"] == "2024-03-01T12:00:00+00:00" and second["check"] == "size" and second["bytes"] > 0

    detail = inspect_checkpoint(root)
    orjson.dumps(detail)
    assert detail["name"] == checkpoint_name(2) and {f["path"] for f in detail["files"]} >= {"dense.safetensors"}

    assert verify_checkpoints(root)["ok"]
    data = bytearray((root / checkpoint_name(2) / "emb_item.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (root / checkpoint_name(2) / "emb_item.safetensors").write_bytes(bytes(data))
    report = verify_checkpoints(root)
    assert (report["ok"], report["would_load"]) == (False, checkpoint_name(1))
    assert "sha256 mismatch" in report["checkpoints"][1]["problems"][0]
    assert list_checkpoints(root)["checkpoints"][1]["intact"]  # a size check cannot see a flipped byte
    assert not verify_checkpoints(root, checkpoint_name(2))["ok"]

    rolled = rollback_checkpoint(root, checkpoint_name(1))
    orjson.dumps(rolled)
    assert (rolled["latest"], rolled["moved"]) == (checkpoint_name(1), [checkpoint_name(2)])
    with CheckpointStore(root, FAST), pytest.raises(CheckpointLockedError):
        rollback_checkpoint(root, checkpoint_name(1))
