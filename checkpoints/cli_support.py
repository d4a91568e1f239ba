"""Plain-dict views of a checkpoint root for ``streamtrain checkpoints list|inspect|verify|rollback``.

Every function returns JSON-able data (``orjson.dumps`` works on it as is); the CLI decides
how to print it. ``list``, ``inspect`` and ``verify`` open the root read-only, so they are
safe beside a running daemon; ``rollback`` takes the writer lock and fails with
:class:`~checkpoints.errors.CheckpointLockedError` while a daemon holds it.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import CheckpointNotFoundError
from .reader import CheckpointStatus
from .store import CheckpointStore


def list_checkpoints(root: Path | str, *, full: bool = False) -> dict[str, Any]:
    """Every checkpoint, oldest first. Quick check (sizes) unless ``full`` (sha256)."""
    store = CheckpointStore(root, readonly=True)
    return {
        "root": str(store.root),
        "latest": store.latest_pointer(),
        "daily": {day.isoformat(): name for day, name in sorted(store.daily_pointers().items())},
        "checkpoints": _summaries(store, store.list_checkpoints(full=full)),
    }


def inspect_checkpoint(root: Path | str, name: str | None = None) -> dict[str, Any]:
    """One checkpoint (default: LATEST's target) with its components and files; quick check."""
    store = CheckpointStore(root, readonly=True)
    name = name if name is not None else store.latest_pointer()
    if name is None:
        raise CheckpointNotFoundError(f"{store.root}/LATEST is missing: name a checkpoint")
    status = store.check(name, full=False)
    (out,) = _summaries(store, [status])
    if status.manifest is not None:
        out["files"] = [f.model_dump() for f in status.manifest.files]
        out["component_files"] = {c: e.files for c, e in status.manifest.components.items()}
        out["extra"] = status.manifest.extra
        out["format_version"] = status.manifest.format_version
    return out


def verify_checkpoints(root: Path | str, name: str | None = None) -> dict[str, Any]:
    """Full sha256 check of one checkpoint, or of all plus what a load would pick.

    ``ok`` is true when the named checkpoint is intact, or (no name) when a load would
    find an intact checkpoint without skipping LATEST's target.
    """
    store = CheckpointStore(root, readonly=True)
    if name is not None:
        summaries = _summaries(store, [store.verify(name)])
        return {"root": str(store.root), "ok": summaries[0]["intact"], "checkpoints": summaries}
    summaries = _summaries(store, store.list_checkpoints(full=True))
    intact = [s["name"] for s in summaries if s["intact"]]
    latest = store.latest_pointer()
    would_load = latest if latest in intact else (intact[-1] if intact else None)
    return {
        "root": str(store.root),
        "ok": would_load is not None and would_load == latest,
        "latest": latest,
        "would_load": would_load,
        "checkpoints": summaries,
    }


def rollback_checkpoint(root: Path | str, name: str) -> dict[str, Any]:
    """Point LATEST at ``name`` (must be intact); newer checkpoints move to ``rolled-back/``."""
    with CheckpointStore(root) as store:
        result = store.rollback(name)
    return {
        "root": str(store.root),
        "latest": result.latest,
        "previous": result.previous,
        "moved": list(result.moved),
        "moved_to": str(result.moved_to) if result.moved_to is not None else None,
    }


def _summaries(store: CheckpointStore, statuses: list[CheckpointStatus]) -> list[dict[str, Any]]:
    latest = store.latest_pointer()
    days: defaultdict[str, list[str]] = defaultdict(list)
    for day, target in sorted(store.daily_pointers().items()):
        days[target].append(day.isoformat())
    return [_summary(status, is_latest=status.name == latest, days=days.get(status.name, [])) for status in statuses]


def _summary(status: CheckpointStatus, *, is_latest: bool, days: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": status.name,
        "intact": status.intact,
        "check": "sha256" if status.full else "size",
        "problems": list(status.problems),
        "is_latest": is_latest,
        "daily": days,
    }
    m = status.manifest
    if m is not None:
        out |= {
            "step": m.step,
            "wall_time": m.wall_time,
            "time": datetime.fromtimestamp(m.wall_time, tz=timezone.utc).isoformat(),
            "watermark": m.watermark,
            "offsets": {topic: {str(p): o for p, o in parts.items()} for topic, parts in m.offsets.items()},
            "config_hash": m.config_hash,
            "parent": m.parent,
            "bytes": m.total_bytes,
            "components": {c: e.format_version for c, e in m.components.items()},
        }
    return out
