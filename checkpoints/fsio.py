"""Every filesystem change the store makes goes through :class:`FileSystem`.

One place for durability (fsync of files and directories, atomic replace) and one seam
for tests: :meth:`FileSystem.before` runs before each mutating operation, so a test
subclass can fail or "crash" at operation *i* for every *i* of a save.

Reads (hashing, loading) do not go through the seam: they change nothing on disk.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from io import FileIO
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

HASH_CHUNK = 1 << 20  # 1 MiB: large enough for full hashing speed, small enough for RAM


@dataclass(frozen=True)
class WrittenFile:
    """Size and sha256 of a file as it is on disk after writing."""

    bytes: int
    sha256: str


def hash_file(path: Path) -> WrittenFile:
    """sha256 and size of ``path``, read in 1 MiB chunks."""
    with open(path, "rb", buffering=0) as f:
        return _hash_stream(f)


def _hash_stream(f: FileIO) -> WrittenFile:
    digest = hashlib.sha256()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    size = 0
    while n := f.readinto(buf):
        digest.update(view[:n])
        size += n
    return WrittenFile(bytes=size, sha256=digest.hexdigest())


class FileSystem:
    """Durable file operations. With ``fsync=False`` the order is kept, the flushes skipped."""

    def __init__(self, *, fsync: bool = True) -> None:
        self.fsync = fsync

    def before(self, op: str, path: Path) -> None:
        """Called before every mutating operation; the default does nothing.

        Tests override it to raise (an ``OSError`` to simulate a failing disk, or a
        ``BaseException`` to simulate the process dying at that instant).
        """

    def mkdir(self, path: Path) -> None:
        self.before("mkdir", path)
        path.mkdir()

    def write_bytes(self, path: Path, data: bytes) -> WrittenFile:
        """Create ``path`` (must not exist), write ``data``, fsync."""
        self.before("write_bytes", path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return WrittenFile(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())

    def write_safetensors(self, path: Path, tensors: Mapping[str, torch.Tensor]) -> WrittenFile:
        """Write ``tensors`` with safetensors (no intermediate copy), fsync, hash what landed.

        safetensors reports I/O failures as ``SafetensorError`` without an errno; they are
        turned into ``OSError`` here so the store has one error type to handle.
        """
        self.before("write_safetensors", path)
        try:
            save_file(dict(tensors), str(path))
        except SafetensorError as exc:
            raise OSError(_errno_of(str(exc)), f"safetensors write failed: {exc}") from exc
        # Hash what is on disk (served from the page cache, which the fsync also flushes).
        with open(path, "rb", buffering=0) as f:
            if self.fsync:
                os.fsync(f.fileno())
            return _hash_stream(f)

    def fsync_dir(self, path: Path) -> None:
        """Make entries created/renamed/removed in ``path`` durable."""
        self.before("fsync_dir", path)
        if not self.fsync:
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src: Path, dst: Path) -> None:
        """Atomic rename (a file over a file, or a directory to a free name)."""
        self.before("rename", src)
        os.replace(src, dst)

    def remove_tree(self, path: Path) -> None:
        self.before("remove_tree", path)
        shutil.rmtree(path)

    def remove_file(self, path: Path) -> None:
        self.before("remove_file", path)
        path.unlink()

    def write_pointer(self, path: Path, target: str) -> None:
        """Atomically make the small file ``path`` contain ``target``.

        Write a temporary file, fsync it, ``os.replace`` it over ``path``, fsync the
        directory: a reader sees the old or the new name, never a torn one.
        """
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            self.write_bytes(tmp, (target + "\n").encode())
            self.rename(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.fsync_dir(path.parent)


def _errno_of(message: str) -> int:
    """Recover the errno from a Rust I/O message such as '... (os error 28)'."""
    marker = "(os error "
    start = message.find(marker)
    if start >= 0:
        digits = message[start + len(marker) :].split(")", 1)[0]
        if digits.isdigit():
            return int(digits)
    return 0
