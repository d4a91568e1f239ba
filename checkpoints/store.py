"""The checkpoint store: atomic save, verified load with fallback, retention, pointers.

This module performs the I/O, through :class:`~checkpoints.fsio.FileSystem` (the seam
where tests inject failures). What to do is decided by pure functions beside it, which
read no disk and are tested without one: ``save_plan`` (what a save writes; whether a
same-step re-save keeps the existing directory), ``recovery`` (leftovers of crashed
operations), ``fallback`` (load order), ``warm_start`` (warm-start specs), ``retention``
and ``rollback``. ``lock`` holds the writer's flock; ``reader`` verifies and loads one
directory.

Layout (DESIGN.md §5)::

    <root>/ckpt-<step:012d>/MANIFEST.json + <component>.safetensors + <component>.json
    <root>/LATEST                  name of the newest committed checkpoint
    <root>/daily/<YYYY-MM-DD>      the first checkpoint saved on that UTC day
    <root>/rolled-back/<when>/...  checkpoints newer than a rollback target, moved aside
    <root>/.lock                   held (flock) by the one writer

Save sequence — a crash at any instant leaves the previous checkpoint loadable::

    mkdir .tmp-ckpt-<step>-<rand>/       write + fsync every component file
    write + fsync MANIFEST.json (last)   fsync the temp dir
    rename to ckpt-<step:012d>           fsync root          <- new checkpoint complete
    replace LATEST (tmp, fsync, rename, fsync root)          <- commit point
    daily pointer, retention             (failures here are warnings, not errors)

Decisions:

* **Same step saved twice** (a replay after a crash re-saves a step whose directory was
  renamed into place before ``LATEST`` moved): if the existing directory is intact and
  holds the same thing (manifest equal but for the wall time: same files' sha256, offsets,
  watermark, config hash, parent, extra), it is kept and only ``LATEST`` is pointed at it.
  Otherwise it is renamed to ``.replaced-<name>-<rand>``, the new one renamed into place,
  and the old one deleted; a writer opening the store puts a ``.replaced-`` directory back
  if a crash left its name empty (``recovery``).
* **Daily pointer** = the *first* checkpoint committed on each UTC day (by the store's
  clock): written once, never moved, so a warm start from ``daily`` is stable all day.
* **Rollback** points ``LATEST`` at an older intact checkpoint, removes daily pointers
  naming newer ones, then moves every newer checkpoint to ``rolled-back/<time>-<rand>/``:
  kept for forensics (retention never touches them; delete by hand), and out of the way
  because training resumes from the target and re-uses their step numbers.
* **Retention** keeps the newest ``keep_last``, ``LATEST``, and the targets of daily
  pointers dated within ``keep_daily`` days; victims are renamed to ``.trash-*`` before
  deletion so a half-deleted directory never looks like a checkpoint.
* **Fallback**: ``load()`` tries ``LATEST``'s target, then every other checkpoint
  newest first, and reports what it skipped and why.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from .codec import EncodedState
from .config import CheckpointConfig
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    NoIntactCheckpointError,
    Skipped,
)
from .fallback import plan_load_order
from .fsio import FileSystem
from .lock import LOCK_FILE, WriterLock
from .manifest import (
    DAILY_DIR,
    LATEST_FILE,
    MANIFEST_FILE,
    REPLACED_PREFIX,
    ROLLED_BACK_DIR,
    TMP_PREFIX,
    TRASH_PREFIX,
    ComponentEntry,
    FileEntry,
    Manifest,
    component_files,
    parse_step,
)
from .reader import Checkpoint, CheckpointStatus, check_dir, load_dir, read_manifest
from .recovery import CleanupOp, plan_cleanup
from .retention import plan_retention
from .rollback import plan_rollback
from .save_plan import plan_save, same_content
from .warm_start import FromDaily, daily_fallback_order, daily_pointer, parse_warm_start

logger = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]  # unix seconds, UTC (time.time)


@dataclass(frozen=True)
class CheckpointInfo:
    """What :meth:`CheckpointStore.save` did."""

    name: str
    path: Path
    manifest: Manifest
    reused: bool  # an identical checkpoint of this step already existed and was kept
    deleted: tuple[str, ...]  # removed by retention after this save
    # Problems after the commit point (daily pointer, retention): the checkpoint is
    # saved and LATEST, but an operator may want to know.
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class Resolution:
    """The newest intact checkpoint and what was passed over to find it."""

    name: str
    skipped: tuple[Skipped, ...]


@dataclass(frozen=True)
class RollbackResult:
    latest: str  # what LATEST names now
    previous: str | None  # what it named before
    moved: tuple[str, ...]  # newer checkpoints moved aside
    moved_to: Path | None  # where they went (None if there were none)


class CheckpointStore:
    """Checkpoints under one root directory.

    A writable store (the default) holds an exclusive ``flock`` on ``<root>/.lock`` until
    :meth:`close`, and on opening removes leftovers of crashed saves. Open with
    ``readonly=True`` to inspect a root that a running daemon is writing (CLI list, verify,
    inspect, warm start from another run): nothing is locked, cleaned or written.

    ``clock`` (unix seconds) stamps manifests and decides daily pointers and retention
    windows; ``fs`` is the filesystem seam tests use to inject failures.
    """

    def __init__(
        self,
        root: Path | str,
        config: CheckpointConfig | None = None,
        *,
        clock: Clock = time.time,
        fs: FileSystem | None = None,
        readonly: bool = False,
    ) -> None:
        self.root = Path(root)
        self.config = config if config is not None else CheckpointConfig()
        self.readonly = readonly
        self._clock = clock
        self._fs = fs if fs is not None else FileSystem(fsync=self.config.fsync)
        self._lock: WriterLock | None = None
        self._continues: str | None = None  # see continue_from()
        if not readonly:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = WriterLock(self.root / LOCK_FILE)
            self._recover()

    # ----------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Release the writer lock (idempotent)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------- save

    def save(
        self,
        step: int,
        components: Mapping[str, Mapping[str, Any]],
        *,
        offsets: Mapping[str, Mapping[int, int]],
        watermark: int | None,
        config_hash: str,
        extra_meta: Mapping[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write one checkpoint atomically and make it ``LATEST``.

        ``components`` maps a component name (``[a-z][a-z0-9_-]*``) to its state dict,
        which must carry an int ``format_version``. ``offsets`` are the next offsets to
        read per topic and partition, consistent with the states (the daemon only saves
        at batch boundaries).

        Raises ``TypeError``/``ValueError`` before touching the disk if a state cannot be
        stored; :class:`CheckpointWriteError` if the disk fails (the previous checkpoint
        stays intact and loadable, the temporary directory is removed).
        """
        self._require_writable()
        plan = plan_save(
            step,
            components,
            offsets=offsets,
            watermark=watermark,
            config_hash=config_hash,
            extra_meta=extra_meta,
            clock=self._clock,
        )
        name = plan.name
        tmp = self.root / f"{TMP_PREFIX}{step}-{uuid.uuid4().hex[:8]}"
        aside = None
        try:
            template = plan.template.model_copy(update={"parent": self._parent_for(name)})
            manifest = self._write_tmp(tmp, plan.encoded, template)
            existing = self._identical_existing(name, manifest)
            if existing is None:
                aside = self._move_into_place(tmp, name)
            else:
                self._fs.remove_tree(tmp)
                manifest = existing
            self._fs.fsync_dir(self.root)
            self._fs.write_pointer(self.root / LATEST_FILE, name)  # the commit point
            self._continues = None  # LATEST is the head of this writer's lineage again
        except Exception as exc:
            # Whatever failed, the temp dir is garbage, and so is a replaced checkpoint
            # once the new one took its name (aside is only set after that rename).
            for garbage in (tmp, aside):
                self._discard(garbage)
            if isinstance(exc, OSError):
                raise CheckpointWriteError(f"saving {name} failed: {exc}", errno=exc.errno or None) from exc
            raise
        warnings: list[str] = []
        if aside is not None:
            self._best_effort(warnings, f"remove replaced {aside.name}", self._fs.remove_tree, aside)
        self._best_effort(warnings, "daily pointer", self._update_daily, name, manifest.wall_time)
        deleted = self._best_effort(warnings, "retention", self.apply_retention) or ()
        reused = existing is not None
        return CheckpointInfo(name, self.root / name, manifest, reused, tuple(deleted), tuple(warnings))

    def _write_tmp(self, tmp: Path, encoded: Mapping[str, tuple[int, EncodedState]], template: Manifest) -> Manifest:
        """Write every component file, then the manifest, into ``tmp``; fsync all of it."""
        self._fs.mkdir(tmp)
        files: list[FileEntry] = []
        entries: dict[str, ComponentEntry] = {}
        for component, (format_version, state) in encoded.items():
            tensor_file, doc_file = component_files(component)
            written = []
            if state.tensors:
                w = self._fs.write_safetensors(tmp / tensor_file, state.tensors)
                files.append(FileEntry(path=tensor_file, bytes=w.bytes, sha256=w.sha256))
                written.append(tensor_file)
            w = self._fs.write_bytes(tmp / doc_file, state.document)
            files.append(FileEntry(path=doc_file, bytes=w.bytes, sha256=w.sha256))
            written.append(doc_file)
            entries[component] = ComponentEntry(format_version=format_version, files=written)
        manifest = template.model_copy(update={"components": entries, "files": files})
        self._fs.write_bytes(tmp / MANIFEST_FILE, manifest.model_dump_json(indent=2).encode())
        self._fs.fsync_dir(tmp)
        return manifest

    def _identical_existing(self, name: str, manifest: Manifest) -> Manifest | None:
        """The manifest of an intact checkpoint ``name`` holding exactly this content, if any
        (a replay after a crash re-saving a step whose directory was already renamed in)."""
        final = self.root / name
        if not final.exists():
            return None
        existing = check_dir(final, full=True)
        if existing.manifest is not None and existing.intact and same_content(existing.manifest, manifest):
            return existing.manifest
        return None

    def _move_into_place(self, tmp: Path, name: str) -> Path | None:
        """Rename ``tmp`` to ``name``. A different checkpoint already there is first renamed
        aside; that directory is returned, to delete once the new one is committed."""
        final = self.root / name
        if not final.exists():
            self._fs.rename(tmp, final)
            return None
        aside = self.root / f"{REPLACED_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
        self._fs.rename(final, aside)
        try:
            self._fs.rename(tmp, final)
        except OSError:
            _restore(aside, final)
            raise
        return aside

    def continue_from(self, name: str) -> None:
        """Declare that the state saved next descends from checkpoint ``name`` (the one the
        writer restored): the next save names it as parent. Without it the parent is what
        LATEST names — wrong when a restore fell back past a damaged LATEST, or resumed
        from an older checkpoint by name: the sample ledger chain would then count the
        retrained samples twice."""
        self._require_writable()
        self._continues = name

    def _parent_for(self, name: str) -> str | None:
        """The checkpoint the saved state descends from (:meth:`continue_from`, else
        LATEST), or - when re-saving that checkpoint's own step - its parent."""
        parent = self._continues or self._latest_pointer()
        if parent is None or parse_step(parent) is None:
            return None
        if parent == name:
            try:
                return read_manifest(self.root / name).parent
            except CheckpointCorruptError:
                return None
        return parent

    def _update_daily(self, name: str, wall_time: float) -> None:
        if self.config.keep_daily == 0:
            return  # no daily window: pointers would be deleted right away
        day = _utc_date(wall_time)
        daily = self.root / DAILY_DIR
        pointer = daily / day.isoformat()
        if pointer.exists():
            return  # first checkpoint of the day wins
        if not daily.exists():
            self._fs.mkdir(daily)
            self._fs.fsync_dir(self.root)
        self._fs.write_pointer(pointer, name)

    # ----------------------------------------------------------------- retention

    def apply_retention(self) -> tuple[str, ...]:
        """Delete what the retention policy does not keep; returns the deleted names."""
        self._require_writable()
        plan = plan_retention(
            self._names(),
            latest=self._latest_pointer(),
            daily=self.daily_pointers(),
            today=_utc_date(self._clock()),
            keep_last=self.config.keep_last,
            keep_daily=self.config.keep_daily,
        )
        self._remove_daily_pointers(plan.expired_days)
        doomed = []
        for name in plan.delete:
            trash = self.root / f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
            self._fs.rename(self.root / name, trash)
            doomed.append(trash)
        if doomed:
            self._fs.fsync_dir(self.root)
        for trash in doomed:
            self._fs.remove_tree(trash)
        if plan.delete:
            logger.info("retention deleted %s", ", ".join(plan.delete))
        return plan.delete

    # ---------------------------------------------------------------------- load

    def load(self, name: str | None = None, *, components: Collection[str] | None = None) -> Checkpoint:
        """Verify (sha256 of every file loaded) and load a checkpoint.

        ``name=None``: LATEST's target, or if it is damaged the newest intact checkpoint;
        ``Checkpoint.skipped`` says what was passed over and why. A given ``name`` has no
        fallback. ``components`` loads (and verifies) only those components.

        Raises :class:`CheckpointNotFoundError` when there is no checkpoint at all and
        :class:`NoIntactCheckpointError` when none is intact.
        """
        if name is not None:
            return load_dir(self._existing(name), components)
        ckpt, skipped = self._first_intact(lambda path: load_dir(path, components))
        return replace(ckpt, skipped=skipped)

    def latest_intact(self) -> Resolution:
        """Like ``load()`` but only verifies: the name ``load()`` would return."""

        def verified(path: Path) -> str:
            status = check_dir(path, full=True)
            if not status.intact:
                raise CheckpointCorruptError(path.name, status.problems)
            return path.name

        name, skipped = self._first_intact(verified)
        return Resolution(name, skipped)

    def _first_intact(self, attempt: Callable[[Path], T]) -> tuple[T, tuple[Skipped, ...]]:
        latest = self._latest_pointer()
        order = plan_load_order(self._names(), latest)
        skipped = list(order.skipped)
        for candidate in order.candidates:
            try:
                result = attempt(self.root / candidate)
            except CheckpointCorruptError as exc:
                skipped.append(Skipped(candidate, "; ".join(exc.problems)))
                continue
            for s in skipped:
                logger.warning("skipped %s: %s", s.name, s.reason)
            return result, tuple(skipped)
        if not order.candidates:
            raise CheckpointNotFoundError(f"no checkpoint under {self.root}")
        raise NoIntactCheckpointError(skipped)

    def resolve_warm_start(self, spec: str) -> Checkpoint:
        """Load the checkpoint a new run should warm-start from.

        ``spec`` is ``"daily"`` (newest daily pointer whose target is intact),
        ``"daily:YYYY-MM-DD"``, a checkpoint name in this store, or a path: a checkpoint
        directory, or another store's root (its newest intact checkpoint, read-only).
        """
        target = parse_warm_start(spec)
        if isinstance(target, FromDaily):
            return self._warm_start_daily(target.day)
        if target.name is not None and (self.root / target.name).is_dir():
            return self.load(target.name)
        path = target.path
        if (path / MANIFEST_FILE).is_file():
            return load_dir(path)
        if (path / LATEST_FILE).is_file() or any(parse_step(p.name) is not None for p in _subdirs(path)):
            return CheckpointStore(path, readonly=True).load()
        raise CheckpointNotFoundError(f"warm start {spec!r}: not 'daily', a checkpoint name here, or a path to one")

    def _warm_start_daily(self, day: str | None) -> Checkpoint:
        pointers = self.daily_pointers()
        if day is not None:
            return self.load(daily_pointer(pointers, day))
        skipped = []
        for pointed_day, name in daily_fallback_order(pointers):
            try:
                ckpt = self.load(name)
            except (CheckpointCorruptError, CheckpointNotFoundError) as exc:
                skipped.append(Skipped(f"daily/{pointed_day}", f"{name}: {exc}"))
                continue
            return replace(ckpt, skipped=tuple(skipped))
        if not skipped:
            raise CheckpointNotFoundError(f"no daily pointer under {self.root / DAILY_DIR}")
        raise NoIntactCheckpointError(skipped)

    # ------------------------------------------------------- listing, inspection

    def list_checkpoints(self, *, full: bool = False) -> list[CheckpointStatus]:
        """Every checkpoint directory, oldest first; ``full`` recomputes every sha256."""
        return [check_dir(self.root / name, full=full) for name in self._names()]

    def check(self, name: str, *, full: bool) -> CheckpointStatus:
        """Check one checkpoint: sizes only, or with ``full`` every sha256."""
        return check_dir(self._existing(name), full=full)

    def verify(self, name: str) -> CheckpointStatus:
        """Full check (sha256 of every file) of one checkpoint."""
        return self.check(name, full=True)

    def latest_pointer(self) -> str | None:
        """What ``LATEST`` says (None if missing); not checked against the disk."""
        return self._latest_pointer()

    def daily_pointers(self) -> dict[date, str]:
        """{day: checkpoint name} from ``daily/`` (unparseable entries ignored)."""
        out = {}
        for path in _files(self.root / DAILY_DIR):
            try:
                day = date.fromisoformat(path.name)
            except ValueError:
                continue
            target = _read_pointer(path)
            if target is not None:
                out[day] = target
        return out

    # ------------------------------------------------------------------ rollback

    def rollback(self, name: str) -> RollbackResult:
        """Make the older, intact checkpoint ``name`` LATEST; move newer ones aside.

        Order: replace LATEST, drop daily pointers naming newer checkpoints, move the newer
        checkpoints to ``rolled-back/<time>-<rand>/``. A crash part-way leaves LATEST right
        and some newer directories unmoved; running the rollback again finishes it.
        Raises :class:`CheckpointWriteError` if the disk fails.
        """
        self._require_writable()
        status = self.verify(name)
        if not status.intact:
            raise CheckpointCorruptError(name, status.problems)
        previous = self._latest_pointer()
        names = self._names()
        try:
            self._fs.write_pointer(self.root / LATEST_FILE, name)
            self._continues = None  # training goes on from the rollback target, which LATEST names
            plan = plan_rollback(name, names, self.daily_pointers())
            self._remove_daily_pointers(plan.drop_days)
            moved_to = self._move_aside(plan.move) if plan.move else None
        except OSError as exc:
            raise CheckpointWriteError(f"rollback to {name} failed: {exc}", errno=exc.errno or None) from exc
        logger.warning("rolled back LATEST %s -> %s; moved %s to %s", previous, name, list(plan.move), moved_to)
        return RollbackResult(latest=name, previous=previous, moved=plan.move, moved_to=moved_to)

    def _move_aside(self, names: Sequence[str]) -> Path:
        stamp = datetime.fromtimestamp(self._clock(), tz=timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        parent = self.root / ROLLED_BACK_DIR
        if not parent.exists():
            self._fs.mkdir(parent)
        dest = parent / f"{stamp}-{uuid.uuid4().hex[:6]}"
        self._fs.mkdir(dest)
        for name in names:
            self._fs.rename(self.root / name, dest / name)
        for directory in (dest, parent, self.root):
            self._fs.fsync_dir(directory)
        return dest

    # ------------------------------------------------------------------ internals

    def _names(self) -> list[str]:
        """Checkpoint directory names under the root, oldest first."""
        return sorted(p.name for p in _subdirs(self.root) if parse_step(p.name) is not None)

    def _existing(self, name: str) -> Path:
        if parse_step(name) is None:
            raise CheckpointNotFoundError(f"{name!r} is not a checkpoint name (ckpt-<12 digits>)")
        path = self.root / name
        if not path.is_dir():
            raise CheckpointNotFoundError(f"no checkpoint {name} under {self.root}")
        return path

    def _latest_pointer(self) -> str | None:
        return _read_pointer(self.root / LATEST_FILE)

    def _require_writable(self) -> None:
        if self._lock is None:
            raise CheckpointError(f"store {self.root} is read-only or closed")

    def _recover(self) -> None:
        """Remove (or put back) what crashed saves, deletions and pointer writes left behind."""
        # What exists in the root, kept up to date below: each decision sees what the
        # clean-ups before it actually did (a failed one changed nothing).
        present = {p.name for p in self.root.iterdir() if p.exists()}
        for path in [*_subdirs(self.root), *_files(self.root), *_files(self.root / DAILY_DIR)]:
            cleanup = plan_cleanup(path.name, is_file=path.is_file(), present=present)
            if cleanup is None:
                continue
            try:
                if cleanup.restore_as is not None:  # CleanupOp.RESTORE
                    self._fs.rename(path, self.root / cleanup.restore_as)
                elif cleanup.op is CleanupOp.REMOVE_TREE:
                    self._fs.remove_tree(path)
                else:
                    self._fs.remove_file(path)
            except OSError as exc:
                logger.warning("could not clean up %s: %s", path, exc)
                continue
            if path.parent == self.root:
                present.discard(path.name)
            if cleanup.restore_as is not None:
                present.add(cleanup.restore_as)
            logger.info("cleaned up %s left by an interrupted operation", path)

    def _remove_daily_pointers(self, days: Sequence[date]) -> None:
        """Retention's expired days, a rollback's pointers to moved checkpoints."""
        for day in days:
            self._fs.remove_file(self.root / DAILY_DIR / day.isoformat())
        if days:
            self._fs.fsync_dir(self.root / DAILY_DIR)

    def _discard(self, path: Path | None) -> None:
        if path is not None and path.exists():
            try:
                self._fs.remove_tree(path)
            except OSError as exc:  # cleaned when a writer next opens the store
                logger.warning("could not remove %s: %s", path, exc)

    @staticmethod
    def _best_effort(warnings: list[str], what: str, fn: Callable[..., T], *args: Any) -> T | None:
        try:
            return fn(*args)
        except OSError as exc:
            warnings.append(f"{what}: {exc}")
            logger.warning("after commit, %s failed: %s", what, exc)
            return None


def _restore(aside: Path, final: Path) -> None:
    try:
        os.replace(aside, final)
    except OSError as exc:  # the next writer to open the store restores it
        logger.warning("could not restore %s: %s", final, exc)


def _read_pointer(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("unreadable pointer %s: %s", path, exc)
        return None


def _subdirs(path: Path) -> Iterator[Path]:
    try:
        yield from (p for p in path.iterdir() if p.is_dir())
    except FileNotFoundError:
        return


def _files(path: Path) -> Iterator[Path]:
    try:
        yield from (p for p in path.iterdir() if p.is_file())
    except FileNotFoundError:
        return


def _utc_date(ts: float) -> date:
    return datetime.fromtimestamp(ts, tz=timezone.utc).date()
