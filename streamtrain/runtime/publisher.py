"""Versioned model publishing: ``published/v<NNNNNN>/`` + an atomically moved ``CURRENT``.

Layout::

    <root>/v000007/MANIFEST.json    version, created, checkpoint it came from, monitor metrics
                                    at release, shadow-check result, files [{path, bytes, sha256}]
    <root>/v000007/<files>          dense weights (safetensors), embeddings, item index, ...
    <root>/CURRENT                  "v000007" (what serving loads)

A version folder is written under a temporary name, fsynced, renamed; only then does
``CURRENT`` move (temp file + ``os.replace``). Serving therefore never sees a partial
version. This module only writes files; *whether* to publish is the gate's decision
(``Gate.publish_allowed()``), checked by the caller — DESIGN §6.3.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from checkpoints.fsio import FileSystem, hash_file

FORMAT_VERSION = 1
_VERSION_RE = re.compile(r"^v(\d{6})$")


class PublishError(RuntimeError):
    """A version could not be written or selected."""


@dataclass(frozen=True)
class PublishedVersion:
    name: str
    number: int
    path: Path
    manifest: dict[str, Any]


class Publisher:
    def __init__(self, root: Path, keep_versions: int = 10, clock: Callable[[], float] = time.time,
                 fs: FileSystem | None = None) -> None:
        self.root = Path(root)
        self.keep_versions = keep_versions
        self._clock = clock
        self._fs = fs or FileSystem()  # the checkpoint store's durable writes: fsync files, dirs, atomic replace
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".tmp-v*"):  # a crash mid-publish leaves these
            shutil.rmtree(leftover, ignore_errors=True)

    def version(self, name: str) -> PublishedVersion | None:
        """One complete version by name (``None`` if absent or without a manifest)."""
        match = _VERSION_RE.match(name)
        manifest_path = self.root / name / "MANIFEST.json"
        if match is None or not manifest_path.is_file():
            return None
        return PublishedVersion(name, int(match.group(1)), self.root / name, orjson.loads(manifest_path.read_bytes()))

    def versions(self) -> list[PublishedVersion]:
        found = (self.version(path.name) for path in sorted(self.root.iterdir()))
        return [v for v in found if v is not None]

    def find(self, *, checkpoint: str) -> PublishedVersion | None:
        """The newest version made from ``checkpoint`` (a replay re-deciding a release it
        already made finds it here instead of publishing the same model again)."""
        matches = [v for v in self.versions() if v.manifest.get("checkpoint") == checkpoint]
        return matches[-1] if matches else None

    def current(self) -> PublishedVersion | None:
        """Reads the pointer and that one manifest: the daemon asks on every loop turn."""
        pointer = self.root / "CURRENT"
        return self.version(pointer.read_text().strip()) if pointer.is_file() else None

    def publish(self, files: Mapping[str, bytes], meta: Mapping[str, Any]) -> PublishedVersion:
        """Write a new version from ``{file name: bytes}`` and make it CURRENT."""
        existing = self.versions()
        number = (existing[-1].number + 1) if existing else 1
        name = f"v{number:06d}"
        tmp = self.root / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        fs = self._fs
        try:
            fs.mkdir(tmp)
            entries = []
            for fname, data in sorted(files.items()):
                written = fs.write_bytes(tmp / fname, data)
                entries.append({"path": fname, "bytes": written.bytes, "sha256": written.sha256})
            manifest = {"format_version": FORMAT_VERSION, "version": name, "created": self._clock(),
                        **meta, "files": entries}
            fs.write_bytes(tmp / "MANIFEST.json", orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
            fs.fsync_dir(tmp)
            fs.rename(tmp, self.root / name)
            fs.fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fs.write_pointer(self.root / "CURRENT", name)
        self._prune()
        return PublishedVersion(name, number, self.root / name, manifest)

    def rollback(self, name: str) -> PublishedVersion:
        """Point CURRENT at an existing, intact version."""
        version = self.version(name)
        if version is None:
            raise PublishError(f"no published version {name!r} under {self.root} (have: {[v.name for v in self.versions()]})")
        problems = verify_version(version)
        if problems:
            raise PublishError(f"version {name} is damaged: {'; '.join(problems)}")
        self._fs.write_pointer(self.root / "CURRENT", name)
        return version

    def _prune(self) -> None:
        """Drop all but the newest ``keep_versions`` (called right after CURRENT moved to the newest)."""
        versions = self.versions()
        for version in versions[: max(0, len(versions) - self.keep_versions)]:
            shutil.rmtree(version.path, ignore_errors=True)


def verify_version(version: PublishedVersion) -> list[str]:
    """sha256 and size of every file listed in the manifest; empty list = intact."""
    problems = []
    for entry in version.manifest.get("files", []):
        try:
            on_disk = hash_file(version.path / entry["path"])
        except OSError as exc:
            problems.append(f"{entry['path']}: {exc.strerror}")
            continue
        if on_disk.bytes != entry["bytes"] or on_disk.sha256 != entry["sha256"]:
            problems.append(f"{entry['path']}: checksum mismatch")
    return problems
