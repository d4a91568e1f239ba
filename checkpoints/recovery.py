"""What to do with the leftovers of interrupted operations: a pure decision per entry.

A writer opening a store asks :func:`plan_cleanup` about every entry of the root and of
``daily/``, and applies the answer through its :class:`~checkpoints.fsio.FileSystem`:

* ``.tmp-ckpt-*`` (a save that never got renamed into place) and ``.trash-*`` (a
  retention victim whose deletion was cut short): remove the tree;
* ``.replaced-<name>-<rand>`` (a checkpoint moved aside so that a re-save of its step
  could take its name): if ``<name>`` is taken, the replacement landed, so the old one is
  garbage; otherwise the crash came between the two renames and it is put back;
* a hidden ``.<pointer>.tmp-<rand>`` file (a pointer write that never got renamed):
  remove it.

Everything else is left alone. One entry at a time rather than one plan for the whole
root, because whether a replaced checkpoint can go back depends on what earlier clean-ups
of the same pass did *or failed to do*: the store passes the names present right now.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from enum import Enum

from .manifest import REPLACED_PREFIX, TMP_PREFIX, TRASH_PREFIX


class CleanupOp(Enum):
    REMOVE_TREE = "remove_tree"
    REMOVE_FILE = "remove_file"
    RESTORE = "restore"  # rename back to the checkpoint name it was moved away from


@dataclass(frozen=True)
class Cleanup:
    op: CleanupOp
    restore_as: str | None = None  # set exactly for RESTORE: the name, in the root, it takes back


def plan_cleanup(name: str, *, is_file: bool, present: Set[str]) -> Cleanup | None:
    """The clean-up for the entry ``name`` (of the root or of ``daily/``), or None to keep it.

    ``is_file`` says whether the entry is a regular file; ``present`` holds the names that
    exist in the root at this moment.
    """
    if name.startswith((TMP_PREFIX, TRASH_PREFIX)):
        return Cleanup(CleanupOp.REMOVE_TREE)
    if name.startswith(REPLACED_PREFIX):
        original = name[len(REPLACED_PREFIX) :].rsplit("-", 1)[0]  # <rand> is a dash-free hex token
        return Cleanup(CleanupOp.REMOVE_TREE) if original in present else Cleanup(CleanupOp.RESTORE, original)
    # Checked after the prefixes above: ``.tmp-ckpt-`` directories also contain ".tmp-".
    if name.startswith(".") and ".tmp-" in name and is_file:
        return Cleanup(CleanupOp.REMOVE_FILE)
    return None
