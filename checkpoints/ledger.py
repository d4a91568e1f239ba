"""The sample ledger: which sample ids each checkpoint trained since its parent.

The daemon saves a ``ledger`` component in every checkpoint holding the ids of the
samples trained since the previous LATEST (the manifest's ``parent``). Walking parent
links back from the newest intact checkpoint gives, oldest first, exactly the samples the
restored model has trained on — what a crash test needs to prove exactly-once
(DESIGN.md §6.1): no id twice, none missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointCorruptError, CheckpointNotFoundError
from .store import CheckpointStore

LEDGER_COMPONENT = "ledger"
LEDGER_FORMAT_VERSION = 1


def ledger_state(sample_ids: np.ndarray | Sequence[int]) -> dict[str, Any]:
    """The ledger component's state for ``sample_ids`` (stored as int64)."""
    ids = np.asarray(sample_ids, dtype=np.int64)
    if ids.ndim != 1:
        raise ValueError(f"sample ids must be 1-D, got shape {ids.shape}")
    return {"format_version": LEDGER_FORMAT_VERSION, "sample_ids": ids}


def ledger_ids(state: dict[str, Any]) -> np.ndarray:
    """The sample ids held by a loaded ledger state. ``(N,) int64``"""
    if state.get("format_version") != LEDGER_FORMAT_VERSION:
        raise ValueError(f"unsupported ledger format_version {state.get('format_version')!r}")
    ids = state["sample_ids"]
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int64:
        raise ValueError("ledger sample_ids must be an int64 numpy array")
    return ids


@dataclass(frozen=True)
class LedgerLink:
    name: str
    step: int
    sample_ids: np.ndarray  # (N,) int64: trained between the parent and this checkpoint


@dataclass(frozen=True)
class LedgerChain:
    links: tuple[LedgerLink, ...]  # oldest first, ending at the newest intact checkpoint
    # The parent that could not be followed (deleted by retention, moved by a rollback);
    # None when the chain reaches a checkpoint without parent, i.e. the very first one.
    truncated_at: str | None

    def sample_ids(self) -> np.ndarray:
        """All ids along the chain, oldest first. ``(sum N,) int64``"""
        return np.concatenate([link.sample_ids for link in self.links]) if self.links else np.empty(0, np.int64)


def ledger_chain(root: Path | str, *, component: str = LEDGER_COMPONENT) -> LedgerChain:
    """Follow parent links from the checkpoint ``load()`` would return (read-only).

    Only the ledger component of each checkpoint is read and verified.
    """
    store = CheckpointStore(root, readonly=True)
    name: str | None = store.latest_intact().name
    links: list[LedgerLink] = []
    seen: set[str] = set()
    while name is not None:
        if name in seen:
            raise CheckpointCorruptError(name, ["parent links form a cycle"])
        seen.add(name)
        try:
            ckpt = store.load(name, components=[component])
        except CheckpointNotFoundError:
            return LedgerChain(tuple(reversed(links)), truncated_at=name)
        links.append(LedgerLink(name, ckpt.step, ledger_ids(ckpt.components[component])))
        name = ckpt.manifest.parent
    return LedgerChain(tuple(reversed(links)), truncated_at=None)
