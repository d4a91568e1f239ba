"""Delta dumps: touched rows and tombstones, written as Parquet and read back with pyarrow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from streamtrain.embedding import EmbeddingTableConfig, write_parquet
from streamtrain.modules.dynamic_embedding import DynamicEmbedding


def make() -> DynamicEmbedding:
    cfg = EmbeddingTableConfig(
        name="users",
        dim=3,
        initial_rows=4,
        max_rows=4,
        default_row="learned",
        admission={"min_count": 1},
        eviction={"policy": "lru", "every_n_steps": 0, "low_watermark": 0.75},
        optimizer={"kind": "sgd", "lr": 0.1},
    )
    return DynamicEmbedding(cfg)


def step(module: DynamicEmbedding, ids: list[int], now_ms: int, train: bool = True) -> None:
    out = module(torch.tensor(ids), now_ms=now_ms)
    if train:
        out.sum().backward()
    module.apply_gradients()


def read(path: Path) -> tuple[dict[int, list[float] | None], dict[bytes, bytes]]:
    table = pq.read_table(path)
    columns = table.to_pydict()
    assert all(d == (e is None) for d, e in zip(columns["deleted"], columns["embedding"]))
    return dict(zip(columns["key"], columns["embedding"])), table.schema.metadata


def current_row(module: DynamicEmbedding, key: int) -> list[float]:
    module.eval()
    row = module(torch.tensor([key]))[0].tolist()
    module.train()
    return row


def test_delta_holds_touched_rows_and_tombstones(tmp_path: Path) -> None:
    module = make()
    step(module, [1, 2, 3, 4], now_ms=0)
    first, meta = read(write_parquet(module.table.take_delta(), tmp_path / "d1.parquet"))
    assert sorted(first) == [1, 2, 3, 4]
    assert all(first[k] == current_row(module, k) for k in first)
    assert meta[b"streamtrain.table"] == b"users" and meta[b"streamtrain.step"] == b"1"
    assert meta[b"streamtrain.dim"] == b"3"

    step(module, [3], now_ms=1)
    step(module, [4], now_ms=2, train=False)  # looked up (recency) but no gradient: no change to serve
    step(module, [5, 9], now_ms=3)  # full: evicts 1, 2, 3 (least recent) to land at 3 rows
    second, meta = read(write_parquet(module.table.take_delta(), tmp_path / "d2.parquet"))
    assert {k for k, e in second.items() if e is None} == {1, 2, 3}  # 3 trained, then evicted
    assert {k for k, e in second.items() if e is not None} == {5, 9}
    assert all(second[k] == current_row(module, k) for k in (5, 9))
    assert np.allclose(json.loads(meta[b"streamtrain.default_row"]), module.table.weight[1].tolist())


def test_nothing_changed_means_an_empty_delta_and_readmission_is_an_upsert(tmp_path: Path) -> None:
    module = make()
    step(module, [1, 2, 3, 4], now_ms=0)
    module.table.take_delta()
    empty, _ = read(write_parquet(module.table.take_delta(), tmp_path / "empty.parquet"))
    assert empty == {}
    step(module, [2, 3, 4], now_ms=1)
    step(module, [5], now_ms=2)  # evicts 1 and 2
    step(module, [1], now_ms=3)  # 1 comes back (fresh row): an upsert, not a tombstone
    delta, _ = read(write_parquet(module.table.take_delta(), tmp_path / "d.parquet"))
    assert delta[1] == current_row(module, 1)
    assert all(delta[k] is None for k in set(delta) - {1, 3, 4, 5})


def test_snapshot_holds_every_live_row_and_resets_nothing(tmp_path: Path) -> None:
    module = make()
    step(module, [1, 2, 3, 4], now_ms=0)
    step(module, [5], now_ms=1)  # evicts two keys
    live = {int(k) for k in module.table.row_keys.tolist() if k}
    snapshot, _ = read(write_parquet(module.table.snapshot(), tmp_path / "full.parquet"))
    assert set(snapshot) == live and all(snapshot[k] == current_row(module, k) for k in live)
    delta, _ = read(write_parquet(module.table.take_delta(), tmp_path / "d.parquet"))
    assert {k for k, e in delta.items() if e is None} == {1, 2, 3, 4} - live
