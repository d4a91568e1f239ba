"""The checkpoint store's pure planners: decisions from names, pointers and manifests alone.

No disk anywhere in this file: that is what the planners are for. The store tests
(``test_checkpoints*.py``) prove that the store applies these plans to real files.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from checkpoints import Skipped, checkpoint_name
from checkpoints.fallback import LoadOrder, plan_load_order
from checkpoints.recovery import Cleanup, CleanupOp, plan_cleanup

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
