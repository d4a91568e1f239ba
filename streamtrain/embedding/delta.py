"""Delta dumps for serving: rows changed since the last dump, and tombstones.

A delta is applied in order by a serving store: upsert every ``keys[i] -> rows[i]``, then
delete every ``deleted`` key. A key evicted and re-admitted between two dumps appears
only as an upsert. Parquet layout (one row per key):

=========  ===================================  ====================================
column     type                                 meaning
=========  ===================================  ====================================
key        int64                                the id
deleted    bool                                 tombstone: drop this key
embedding  fixed_size_list<float32>[dim], null  the row (null on tombstones)
=========  ===================================  ====================================

File metadata: ``streamtrain.table``, ``streamtrain.step``, ``streamtrain.dim``,
``streamtrain.format_version`` and ``streamtrain.default_row`` (JSON list: the vector
served for keys without a row, learned or zero).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import redis

DELTA_FORMAT_VERSION: Final = 1


@dataclass(frozen=True)
class EmbeddingDelta:
    table: str
    step: int  # training steps the table had taken when the delta was cut
    keys: np.ndarray  # (N,) int64 upserted ids
    rows: np.ndarray  # (N, D) float32 their current rows
    deleted: np.ndarray  # (M,) int64 evicted ids (disjoint from keys)
    default_row: np.ndarray  # (D,) float32 served for ids without a row

    def __post_init__(self) -> None:
        if self.rows.shape != (self.keys.shape[0], self.default_row.shape[0]):
            raise ValueError(f"rows {self.rows.shape} do not match keys {self.keys.shape} x dim {self.default_row.shape}")


def to_arrow(delta: EmbeddingDelta) -> pa.Table:
    dim = delta.default_row.shape[0]
    n, m = delta.keys.shape[0], delta.deleted.shape[0]
    values = pa.array(np.concatenate([delta.rows.reshape(-1), np.zeros(m * dim, np.float32)]), pa.float32())
    deleted = np.concatenate([np.zeros(n, bool), np.ones(m, bool)])  # (N + M,)
    embedding = pa.FixedSizeListArray.from_arrays(values, dim, mask=pa.array(deleted))
    metadata = {
        "streamtrain.table": delta.table,
        "streamtrain.step": str(delta.step),
        "streamtrain.dim": str(dim),
        "streamtrain.format_version": str(DELTA_FORMAT_VERSION),
        "streamtrain.default_row": json.dumps(delta.default_row.tolist()),
    }
    return pa.table(
        {
            "key": pa.array(np.concatenate([delta.keys, delta.deleted]), pa.int64()),
            "deleted": pa.array(deleted),
            "embedding": embedding,
        }
    ).replace_schema_metadata(metadata)


def write_parquet(delta: EmbeddingDelta, path: str | Path) -> Path:
    """Write the delta as one Parquet file (written to ``path.tmp``, then renamed)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(to_arrow(delta), tmp)
    tmp.replace(path)
    return path


def read_parquet(path: str | Path) -> EmbeddingDelta:
    """Read a delta written by :func:`write_parquet` (or a published table snapshot)."""
    table = pq.read_table(path)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("streamtrain.format_version") != str(DELTA_FORMAT_VERSION):
        raise ValueError(f"{path}: embedding delta format {meta.get('streamtrain.format_version')!r}, "
                         f"expected {DELTA_FORMAT_VERSION}")
    dim = int(meta["streamtrain.dim"])
    deleted = table.column("deleted").to_numpy()
    keys = table.column("key").to_numpy()
    embedding = table.column("embedding").combine_chunks()
    # The child array holds dim values for every entry, tombstones included (masked zeros).
    rows = embedding.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(keys), dim)
    return EmbeddingDelta(
        table=meta["streamtrain.table"],
        step=int(meta["streamtrain.step"]),
        keys=keys[~deleted].astype(np.int64),
        rows=rows[~deleted],
        deleted=keys[deleted].astype(np.int64),
        default_row=np.asarray(json.loads(meta["streamtrain.default_row"]), np.float32),
    )


def push_to_redis(delta: EmbeddingDelta, client: redis.Redis, hash_key: str, chunk: int = 10_000) -> None:
    """Apply the delta to the Redis hash ``hash_key``: field = decimal id, value = the row as
    little-endian float32 bytes (``np.frombuffer(v, "<f4")``); tombstones are ``HDEL``-ed.
    The default row goes to the string key ``<hash_key>:default``. Errors propagate: a
    publisher must know its push failed.
    """
    rows = delta.rows.astype("<f4", copy=False)
    pipe = client.pipeline(transaction=False)
    for start in range(0, delta.keys.shape[0], chunk):
        part = slice(start, start + chunk)
        pipe.hset(hash_key, mapping={str(k): r.tobytes() for k, r in zip(delta.keys[part].tolist(), rows[part])})
    for start in range(0, delta.deleted.shape[0], chunk):
        pipe.hdel(hash_key, *map(str, delta.deleted[start : start + chunk].tolist()))
    pipe.set(f"{hash_key}:default", delta.default_row.astype("<f4").tobytes())
    pipe.execute()
