"""The checkpoint store's pure planners: decisions from names and pointers alone.

No disk anywhere in this file: that is what the planners are for. The store tests
(``test_checkpoints*.py``) prove that the store applies these plans to real files.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from checkpoints import CheckpointNotFoundError, Manifest, Skipped, checkpoint_name
from checkpoints.fallback import LoadOrder, plan_load_order
from checkpoints.manifest import ComponentEntry, FileEntry
from checkpoints.recovery import Cleanup, CleanupOp, plan_cleanup
from checkpoints.rollback import RollbackPlan, plan_rollback
from checkpoints.save_plan import plan_save, same_content
from checkpoints.warm_start import FromDaily, FromLocation, daily_fallback_order, daily_pointer, parse_warm_start

# ------------------------------------------------------------------- recovery

REMOVE_TREE = Cleanup(CleanupOp.REMOVE_TREE)


def test_cleanup_removes_temp_and_trash_directories() -> None:
    for name in (".tmp-ckpt-3-0a0b0c0d", ".trash-ckpt-000000000001-12345678"):
        assert plan_cleanup(name, is_file=False, present={name}) == REMOVE_TREE


def test_cleanup_restores_a_replaced_checkpoint_only_while_its_name_is_free() -> None:
    aside = ".replaced-ckpt-000000000002-abcd1234"  # the checkpoint name itself has a dash
    restore = Cleanup(CleanupOp.RESTORE, restore_as=checkpoint_name(2))
    assert plan_cleanup(aside, is_file=False, present={aside, checkpoint_name(1)}) == restore
    # The replacement landed (or a first aside was already put back): this one is garbage.
    assert plan_cleanup(aside, is_file=False, present={aside, checkpoint_name(2)}) == REMOVE_TREE


def test_cleanup_removes_unrenamed_pointer_files_only() -> None:
    for name in (".LATEST.tmp-1234abcd", ".2024-03-01.tmp-99999999"):
        assert plan_cleanup(name, is_file=True, present=set()) == Cleanup(CleanupOp.REMOVE_FILE)
        assert plan_cleanup(name, is_file=False, present=set()) is None  # not what a pointer write makes


def test_cleanup_keeps_everything_else() -> None:
    for name, is_file in [
        (checkpoint_name(1), False),
        ("LATEST", True),
        ("daily", False),
        ("rolled-back", False),
        ("2024-03-01", True),
        (".lock", True),
    ]:
        assert plan_cleanup(name, is_file=is_file, present={name}) is None, name


@given(st.text(min_size=1).filter(lambda n: not n.startswith(".")), st.booleans())
def test_cleanup_never_touches_a_visible_name(name: str, is_file: bool) -> None:
    """Only hidden names are ever leftovers: a checkpoint, a pointer, a folder of the
    layout can never be removed by a writer opening the store."""
    assert plan_cleanup(name, is_file=is_file, present={name}) is None


# ------------------------------------------------------------ load fallback


def test_load_order_is_latest_then_newest_first() -> None:
    names = [checkpoint_name(s) for s in (3, 1, 4, 2)]  # any order in, step order out
    order = plan_load_order(names, checkpoint_name(2))
    assert order.candidates == tuple(checkpoint_name(s) for s in (2, 4, 3, 1))
    assert order.skipped == ()  # a newer uncommitted checkpoint is no fault of LATEST


def test_load_order_reports_a_missing_or_dangling_latest() -> None:
    names = [checkpoint_name(1), checkpoint_name(2)]
    newest_first = (checkpoint_name(2), checkpoint_name(1))
    missing = plan_load_order(names, None)
    assert missing == LoadOrder(newest_first, (Skipped("LATEST", "missing"),))
    dangling = plan_load_order(names, checkpoint_name(42))
    assert dangling.candidates == newest_first
    assert [s.name for s in dangling.skipped] == ["LATEST"] and "'ckpt-000000000042'" in dangling.skipped[0].reason


def test_load_order_of_an_empty_root_has_nothing_to_skip() -> None:
    assert plan_load_order([], None) == LoadOrder((), ())


# ----------------------------------------------------------------- warm start


def test_warm_start_spec_daily_forms() -> None:
    assert parse_warm_start("daily") == FromDaily(None)
    assert parse_warm_start("daily:") == FromDaily(None)
    assert parse_warm_start("daily:2024-03-02") == FromDaily("2024-03-02")


def test_warm_start_spec_name_or_path() -> None:
    name = checkpoint_name(7)
    assert parse_warm_start(name) == FromLocation(name, Path(name))  # a name here, else a relative path
    assert parse_warm_start("/runs/a/checkpoints") == FromLocation(None, Path("/runs/a/checkpoints"))
    assert parse_warm_start("ckpt-7") == FromLocation(None, Path("ckpt-7"))  # not 12 digits: only a path
    assert parse_warm_start("dailies") == FromLocation(None, Path("dailies"))


# Not in date order: the planners must not depend on the order pointers were listed in.
POINTERS = {
    date(2024, 3, 2): checkpoint_name(5),
    date(2024, 3, 1): checkpoint_name(1),
    date(2024, 3, 3): checkpoint_name(9),
}


def test_daily_pointer_of_a_given_day() -> None:
    assert daily_pointer(POINTERS, "2024-03-01") == checkpoint_name(1)
    with pytest.raises(CheckpointNotFoundError, match="no daily pointer for 2024-02-29"):
        daily_pointer(POINTERS, "2024-02-29")
    with pytest.raises(ValueError):
        daily_pointer(POINTERS, "yesterday")


def test_daily_fallback_is_newest_day_first() -> None:
    assert daily_fallback_order(POINTERS) == [
        (date(2024, 3, 3), checkpoint_name(9)),
        (date(2024, 3, 2), checkpoint_name(5)),
        (date(2024, 3, 1), checkpoint_name(1)),
    ]
    assert daily_fallback_order({}) == []


# ------------------------------------------------------------------- rollback


def test_rollback_moves_every_newer_checkpoint_and_drops_their_daily_pointers() -> None:
    names = [checkpoint_name(s) for s in (1, 5, 9, 10)]
    plan = plan_rollback(checkpoint_name(5), names, POINTERS)
    assert plan.move == (checkpoint_name(9), checkpoint_name(10))  # 10 after 9: step order, not text length
    assert plan.drop_days == (date(2024, 3, 3),)  # 2024-03-03 named ckpt 9; the others stay


def test_rollback_to_the_newest_changes_nothing_else() -> None:
    names = [checkpoint_name(s) for s in (1, 5, 9)]
    assert plan_rollback(checkpoint_name(9), names, POINTERS) == RollbackPlan(move=(), drop_days=())


def test_rollback_drops_every_pointer_to_a_moved_checkpoint_in_day_order() -> None:
    daily = {
        date(2024, 3, 9): checkpoint_name(3),
        date(2024, 3, 4): checkpoint_name(2),
        date(2024, 3, 1): checkpoint_name(1),
    }
    plan = plan_rollback(checkpoint_name(1), [checkpoint_name(s) for s in (1, 2, 3)], daily)
    assert plan.drop_days == (date(2024, 3, 4), date(2024, 3, 9))


# ----------------------------------------------------------------------- save


def test_save_plan_holds_everything_but_what_writing_decides() -> None:
    offsets = {"events": {1: 7, 0: 10}}
    plan = plan_save(
        12,
        {"dense": {"format_version": 3, "w": torch.ones(2)}, "joiner": {"format_version": 1, "pending": []}},
        offsets=offsets,
        watermark=5000,
        config_hash="cfg",
        extra_meta={"run": "a"},
        clock=lambda: 1709287200.0,
    )
    assert plan.name == checkpoint_name(12)
    assert {c: (v, sorted(s.tensors)) for c, (v, s) in plan.encoded.items()} == {"dense": (3, ["w"]), "joiner": (1, [])}
    t = plan.template
    assert (t.step, t.wall_time, t.watermark, t.config_hash, t.extra) == (12, 1709287200.0, 5000, "cfg", {"run": "a"})
    assert (t.parent, t.components, t.files) == (None, {}, [])
    assert t.offsets == offsets and t.offsets["events"] is not offsets["events"]  # a copy, not the caller's dict


def test_save_plan_refuses_a_step_outside_the_name_format() -> None:
    components = {"x": {"format_version": 1}}
    with pytest.raises(ValueError, match="outside"):
        plan_save(10**12, components, offsets={}, watermark=None, config_hash="c", extra_meta=None, clock=lambda: 0.0)


def _manifest(**changes: Any) -> Manifest:
    base = Manifest(
        step=2,
        wall_time=100.0,
        watermark=2000,
        offsets={"events": {0: 2}},
        config_hash="cfg",
        parent=checkpoint_name(1),
        components={"dense": ComponentEntry(format_version=1, files=["dense.json"])},
        files=[
            FileEntry(path="dense.json", bytes=10, sha256="a" * 64),
            FileEntry(path="x.json", bytes=1, sha256="b" * 64),
        ],
    )
    return base.model_copy(update=changes)


def test_same_content_ignores_only_the_wall_time_and_file_order() -> None:
    a = _manifest()
    assert same_content(a, _manifest(wall_time=999.0))
    assert same_content(a, _manifest(files=list(reversed(a.files))))
    for different in [
        _manifest(files=[a.files[0].model_copy(update={"sha256": "c" * 64}), a.files[1]]),
        _manifest(offsets={"events": {0: 3}}),
        _manifest(parent=None),
        _manifest(watermark=None),
        _manifest(config_hash="other"),
        _manifest(extra={"k": 1}),
        _manifest(components={"dense": ComponentEntry(format_version=2, files=["dense.json"])}),
    ]:
        assert not same_content(a, different), different
