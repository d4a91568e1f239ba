"""Read-only access to one checkpoint directory: verify it, load it.

Nothing here changes the disk, so it serves the store, warm starts from a foreign path,
and read-only CLI commands alike.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
from safetensors.torch import load_file

from .codec import decode_state
from .errors import CheckpointCorruptError, Skipped
from .fsio import hash_file
from .manifest import MANIFEST_FILE, MANIFEST_FORMAT_VERSION, FileEntry, Manifest, parse_step


@dataclass(frozen=True)
class Checkpoint:
    """A verified, loaded checkpoint. ``components`` maps component name -> state dict."""

    name: str
    path: Path
    manifest: Manifest
    components: dict[str, dict[str, Any]]
    # Newer checkpoints passed over to reach this one (damaged ones), newest first.
    skipped: tuple[Skipped, ...] = field(default=())

    @property
    def step(self) -> int:
        return self.manifest.step

    @property
    def offsets(self) -> dict[str, dict[int, int]]:
        """{topic: {partition: next offset to read}} at the cut."""
        return self.manifest.offsets

    @property
    def watermark(self) -> int | None:
        return self.manifest.watermark


@dataclass(frozen=True)
class CheckpointStatus:
    """Outcome of checking a checkpoint directory.

    ``full`` says whether every sha256 was recomputed; a quick check only reads the
    manifest and compares file sizes (enough for listings of large checkpoints).
    """

    name: str
    path: Path
    manifest: Manifest | None
    problems: tuple[str, ...]
    full: bool

    @property
    def intact(self) -> bool:
        return not self.problems


def read_manifest(path: Path) -> Manifest:
    """Parse and sanity-check ``path/MANIFEST.json``; raise :class:`CheckpointCorruptError`."""
    try:
        raw = (path / MANIFEST_FILE).read_bytes()
    except FileNotFoundError:
        raise CheckpointCorruptError(path.name, ["MANIFEST.json is missing"]) from None
    except OSError as exc:
        raise CheckpointCorruptError(path.name, [f"MANIFEST.json unreadable: {exc}"]) from exc
    try:
        manifest = Manifest.model_validate_json(raw)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointCorruptError(path.name, [f"MANIFEST.json invalid: {where}: {first['msg']}"]) from None
    problems = []
    if manifest.format_version > MANIFEST_FORMAT_VERSION:
        problems.append(
            f"manifest format_version {manifest.format_version} is newer than supported ({MANIFEST_FORMAT_VERSION})"
        )
    step = parse_step(path.name)
    if step is not None and step != manifest.step:
        problems.append(f"manifest says step {manifest.step} but the directory is {path.name}")
    listed = {f.path for f in manifest.files}
    for component, entry in manifest.components.items():
        problems += [f"component {component!r} file {p} is not listed" for p in entry.files if p not in listed]
    if problems:
        raise CheckpointCorruptError(path.name, problems)
    return manifest


def check_dir(path: Path, *, full: bool) -> CheckpointStatus:
    """Check a checkpoint directory; ``full`` recomputes every sha256."""
    try:
        manifest = read_manifest(path)
    except CheckpointCorruptError as exc:
        return CheckpointStatus(path.name, path, None, exc.problems, full)
    problems = [p for entry in manifest.files if (p := _check_file(path, entry, full=full))]
    return CheckpointStatus(path.name, path, manifest, tuple(problems), full)


def load_dir(path: Path, components: Collection[str] | None = None) -> Checkpoint:
    """Verify (sha256) and load a checkpoint directory, or just the named ``components``.

    Every file that is loaded is hashed first; with ``components=None`` that is every file
    of the checkpoint. Raises :class:`CheckpointCorruptError` on any mismatch.
    """
    manifest = read_manifest(path)
    wanted = list(manifest.components) if components is None else list(components)
    missing = [c for c in wanted if c not in manifest.components]
    if missing:
        raise KeyError(f"{path.name} has no component(s) {missing}; it has {sorted(manifest.components)}")
    entries = {f.path: f for f in manifest.files}
    states = {}
    for component in wanted:
        files = manifest.components[component].files
        problems = [p for rel in files if (p := _check_file(path, entries[rel], full=True))]
        if problems:
            raise CheckpointCorruptError(path.name, problems)
        states[component] = _decode_component(path, component, files)
    return Checkpoint(name=path.name, path=path, manifest=manifest, components=states)


def _check_file(ckpt: Path, entry: FileEntry, *, full: bool) -> str | None:
    """A problem description, or None if the file matches its manifest entry."""
    target = ckpt / entry.path
    try:
        size = target.stat().st_size
        if size != entry.bytes:
            return f"{entry.path} has {size} bytes, manifest says {entry.bytes} (truncated or overwritten)"
        if full and hash_file(target).sha256 != entry.sha256:
            return f"{entry.path} sha256 mismatch (corrupted)"
    except FileNotFoundError:
        return f"{entry.path} is missing"
    except OSError as exc:
        return f"{entry.path} unreadable: {exc}"
    return None


def _decode_component(ckpt: Path, component: str, files: list[str]) -> dict[str, Any]:
    tensors = {}
    document = None
    for rel in files:
        if rel.endswith(".safetensors"):
            tensors = load_file(str(ckpt / rel))
        else:
            document = (ckpt / rel).read_bytes()
    if document is None:
        raise CheckpointCorruptError(ckpt.name, [f"component {component!r} has no JSON document"])
    try:
        return decode_state(document, tensors)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise CheckpointCorruptError(ckpt.name, [f"component {component!r} does not decode: {exc}"]) from exc
