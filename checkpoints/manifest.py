"""The manifest (``MANIFEST.json``) and the names used on disk (DESIGN.md §5).

The manifest is written last into a checkpoint's temporary folder: its presence and its
sha256 list are what make a checkpoint *complete*.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_FORMAT_VERSION = 1
MANIFEST_FILE = "MANIFEST.json"
LATEST_FILE = "LATEST"
DAILY_DIR = "daily"
ROLLED_BACK_DIR = "rolled-back"

CHECKPOINT_PREFIX = "ckpt-"
# Hidden names: never mistaken for checkpoints, cleaned (or restored) when a writer opens.
TMP_PREFIX = ".tmp-ckpt-"  # a save in progress
REPLACED_PREFIX = ".replaced-"  # a same-step checkpoint moved aside while being replaced
TRASH_PREFIX = ".trash-"  # a checkpoint being deleted by retention

_NAME_RE = re.compile(r"^ckpt-(\d{12})$")
_COMPONENT_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


def checkpoint_name(step: int) -> str:
    """``ckpt-<step:012d>``: names sort in step order."""
    if not 0 <= step < 10**12:
        raise ValueError(f"step {step} is outside 0..10^12-1")
    return f"{CHECKPOINT_PREFIX}{step:012d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint name, or None if ``name`` is not one."""
    match = _NAME_RE.match(name)
    return int(match.group(1)) if match else None


def check_component_name(name: str) -> None:
    """Component names become file names: lower-case, no dots, never ``MANIFEST``."""
    if not _COMPONENT_RE.match(name):
        raise ValueError(f"component name {name!r} must match {_COMPONENT_RE.pattern}")


def component_files(name: str) -> tuple[str, str]:
    """(safetensors file, JSON document file) of a component, relative to the checkpoint."""
    return f"{name}.safetensors", f"{name}.json"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FileEntry(_Frozen):
    path: str  # relative to the checkpoint directory
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ComponentEntry(_Frozen):
    format_version: int  # the component's own state format, copied from its state
    files: list[str]  # paths (relative) of the files holding this component


class Manifest(_Frozen):
    format_version: int = MANIFEST_FORMAT_VERSION  # of this manifest / store layout
    step: int = Field(ge=0)
    wall_time: float  # unix seconds (UTC) when the save started, from the store's clock
    watermark: int | None  # event-time watermark (ms) at the cut; None before any event
    offsets: dict[str, dict[int, int]]  # {topic: {partition: next offset to read}}
    config_hash: str  # hash of the effective daemon config that produced this state
    parent: str | None  # LATEST at save time: the chain the ledger follows
    components: dict[str, ComponentEntry]
    files: list[FileEntry]
    extra: dict[str, Any] = Field(default_factory=dict)  # caller's metadata (JSON values)

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)
