"""Checkpoint save and restore of one embedding table, beside torch.save and raw bytes (part of ``bench.daemon``).

An ``EmbeddingTable`` of N rows x 64 dims, every row admitted (row-wise Adagrad slot, keys,
scores), saved through ``CheckpointStore`` with fsync on (state_dict copy, safetensors,
sha256, manifest, renames) and restored (sha256 verify, safetensors read,
``load_state_dict`` with its hash-map rebuild), checked equal. Baselines: ``torch.save`` +
fsync / ``torch.load(weights_only=True)`` of the same tensors, and a raw write + fsync /
read of their bytes (the floor). The three are interleaved; best of the repeats, median
reported too. Restores read from the page cache (the files were just written).
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import interleaved
from checkpoints import CheckpointStore
from checkpoints.config import CheckpointConfig
from streamtrain.embedding import AdmissionConfig, EmbeddingTable, EmbeddingTableConfig, EvictionConfig
from streamtrain.embedding.hashing import mix64

DIM = 64
Phases = dict[str, float]  # phase name -> seconds, of one run of one contender


@dataclass(frozen=True)
class Sizes:
    rows: int  # of the table
    repeats: int  # interleaved rounds of ours / torch.save / raw bytes


QUICK = Sizes(rows=100_000, repeats=2)
FULL = Sizes(rows=1_000_000, repeats=3)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def filled_table(rows: int) -> EmbeddingTable:
    """A table with ``rows`` keys admitted (one training step, no gradients)."""
    cfg = EmbeddingTableConfig(name="bench", dim=DIM, initial_rows=rows, max_rows=rows,
                               admission=AdmissionConfig(min_count=1),
                               eviction=EvictionConfig(policy="none", every_n_steps=0))
    table = EmbeddingTable(cfg)
    keys = (mix64(torch.arange(1, rows + 1, dtype=torch.int64)) & ((1 << 63) - 1)) | 1
    for chunk in keys.split(1 << 17):
        table.lookup(chunk, train=True, now_ms=0)
    table.apply_gradients([])
    if table.size != rows:
        raise RuntimeError(f"admitted {table.size} keys, wanted {rows}")
    return table


class StoreRoundTrip:
    """Ours: copy the state, write it atomically (fsync, sha256, manifest), read it back into a
    fresh table (the daemon builds its tables before restoring) and check it."""

    def __init__(self, table: EmbeddingTable, store: CheckpointStore) -> None:
        self.table, self.store = table, store
        self.bytes = 0  # on disk, from the last save's manifest

    def __call__(self, r: int) -> Phases:
        t = time.perf_counter()
        state = self.table.state_dict()
        t1 = time.perf_counter()
        info = self.store.save(r + 1, {"table": state}, offsets={}, watermark=None, config_hash="bench-daemon")
        t2 = time.perf_counter()
        self.bytes = sum(f.bytes for f in info.manifest.files)
        fresh = EmbeddingTable(self.table.config)
        t3 = time.perf_counter()
        ckpt = self.store.load(info.name)
        t4 = time.perf_counter()
        fresh.load_state_dict(ckpt.components["table"])
        t5 = time.perf_counter()
        if not torch.equal(fresh.weight, self.table.weight) or fresh.size != self.table.size:
            raise RuntimeError("restored table differs from the saved one")
        del ckpt, fresh, state
        gc.collect()
        return {"state_dict": t1 - t, "store_save": t2 - t1, "store_load": t4 - t3, "load_state_dict": t5 - t4}


def torch_round_trip(tensors: dict[str, torch.Tensor], tmp: Path) -> Callable[[int], Phases]:
    """Baseline: torch.save + fsync of the same tensors, torch.load(weights_only=True)."""

    def run(r: int) -> Phases:
        path = tmp / f"torch-{r}.pt"
        t = time.perf_counter()
        torch.save(tensors, path)
        fsync_path(path)
        fsync_path(tmp)
        t1 = time.perf_counter()
        loaded = torch.load(path, weights_only=True)
        t2 = time.perf_counter()
        del loaded
        path.unlink()
        gc.collect()
        return {"torch_save": t1 - t, "torch_load": t2 - t1}

    return run


def raw_round_trip(tensors: dict[str, torch.Tensor], tmp: Path) -> Callable[[int], Phases]:
    """Floor: the tensors' bytes back to back in one file, write + fsync; read them into fresh tensors."""

    def run(r: int) -> Phases:
        path = tmp / f"raw-{r}.bin"
        t = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for v in tensors.values():
                view = memoryview(v.contiguous().view(torch.uint8).numpy().reshape(-1))
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_path(tmp)
        t1 = time.perf_counter()
        back = {}
        with open(path, "rb", buffering=0) as f:
            for k, v in tensors.items():
                back[k] = torch.empty_like(v)
                f.readinto(memoryview(back[k].view(torch.uint8).numpy().reshape(-1)))
        t2 = time.perf_counter()
        del back
        path.unlink()
        gc.collect()
        return {"raw_write": t1 - t, "raw_read": t2 - t1}

    return run


def run(tmp: Path, sizes: Sizes) -> dict[str, Any]:
    table = filled_table(sizes.rows)
    root = tmp / "ckpt"
    tensors = {k: v for k, v in table.state_dict().items() if isinstance(v, torch.Tensor)}  # what the baselines write
    with CheckpointStore(root, CheckpointConfig(root=root, fsync=True, keep_last=sizes.repeats + 1)) as store:
        ours = StoreRoundTrip(table, store)
        runs = interleaved({"ours": ours, "torch": torch_round_trip(tensors, tmp), "raw": raw_round_trip(tensors, tmp)},
                           sizes.repeats)
    times = {phase: [r[phase] for r in contender] for contender in runs.values() for phase in contender[0]}
    best = {k: min(v) for k, v in times.items()}
    median = {k: float(np.median(v)) for k, v in times.items()}
    return {
        "rows": sizes.rows, "dim": DIM, "bytes": ours.bytes, "repeats": sizes.repeats,
        "ckpt_save_s": best["state_dict"] + best["store_save"],
        "ckpt_restore_s": best["store_load"] + best["load_state_dict"],
        "ckpt_save_median_s": median["state_dict"] + median["store_save"],
        "ckpt_restore_median_s": median["store_load"] + median["load_state_dict"],
        "torch_save_s": best["torch_save"], "torch_load_s": best["torch_load"],
        "raw_write_s": best["raw_write"], "raw_read_s": best["raw_read"],
        "parts_best_s": best, "parts_median_s": median,
    }
