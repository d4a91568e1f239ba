"""Published versions in Redis for online lookup: every version under its own namespace,
one pointer key that serving follows. The layout is a contract for serving (docs/architecture.md)::

    P serve:current                    name of the version to serve, e.g. "v000007" (moved last)
    P serve:versions                   sorted set of the versions complete in Redis, score = number
    P serve:<v>:manifest               JSON: version, number, checkpoint, created, samples, dense (path of the
                                       dense weights), index (path of the FAISS item index), tables
                                       {name: {key, rows, dim}}, base (version the delta was taken against
                                       or null), pushed ("delta" | "full")
    P serve:<v>:emb:<table>            hash: decimal id -> the row, dim x float32 little-endian
    P serve:<v>:emb:<table>:default    the row for ids without one (float32 little-endian)

``P`` is ``redis.key_prefix``. A version's keys never change once its manifest exists: the
manifest is written after every row, the pointer moves after the manifest, so a reader
that reads ``current`` once and then that version's keys gets exactly one version — never
a mix. Only the rows that changed travel: the version's hash starts as a server-side
``COPY`` of another complete version still in Redis, then gets the difference between the
two versions' Parquet tables (upserts, and tombstones for ids the newer one dropped). With no
such base (the first push, a flushed or restarted Redis, a base pruned from disk) the
whole table is written. The newest ``keep_versions`` versions stay (plus whatever the
pointer names); older ones expire ``expire_grace_s`` after they drop out.

The files on disk are the truth: Redis is a copy made from them after the version was
published, and a failed push loses nothing. ``sync`` makes Redis follow ``CURRENT`` —
the daemon calls it at start, after each publish and after a rollback; a failure is logged
and counted, and the next call retries (delta against whatever complete version Redis
still holds, else full). Deltas are read from the published files rather than from the
tables' ``take_delta()``: draining the tables' change flags at publish time would make the
checkpointed table state depend on whether this process published or found the version
already published (a replay), and a delta must be relative to what Redis holds, which only
the files know.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from streamtrain.embedding.delta import EmbeddingDelta, push_to_redis, read_parquet
from streamtrain.runtime.publisher import PublishedVersion, Publisher
from streamtrain.runtime.releases import DENSE_FILE, INDEX_FILE, table_file

log = logging.getLogger(__name__)

PARTIAL_TTL_S = 3600  # keys of a push that never finished (a crash mid-push) go away on their own


@dataclass(frozen=True)
class ServingKeys:
    prefix: str = "streamtrain:"

    @property
    def current(self) -> str:
        return f"{self.prefix}serve:current"

    @property
    def versions(self) -> str:
        return f"{self.prefix}serve:versions"

    def manifest(self, version: str) -> str:
        return f"{self.prefix}serve:{version}:manifest"

    def table(self, version: str, name: str) -> str:
        return f"{self.prefix}serve:{version}:emb:{name}"

    def default(self, version: str, name: str) -> str:
        return f"{self.table(version, name)}:default"  # where push_to_redis puts it


def table_names(version: PublishedVersion) -> list[str]:
    """The embedding tables a version holds, from its manifest's file list."""
    files = [entry["path"] for entry in version.manifest.get("files", [])]
    return sorted(f[len("embedding-"):-len(".parquet")] for f in files if f.startswith("embedding-") and f.endswith(".parquet"))


def table_delta(old: EmbeddingDelta, new: EmbeddingDelta) -> EmbeddingDelta:
    """What turns table ``old`` into ``new`` (both full snapshots): rows that are new or
    differ in any bit, and tombstones for ids ``new`` no longer has."""
    order = np.argsort(old.keys)
    old_keys, old_rows = old.keys[order], old.rows[order]
    at = np.searchsorted(old_keys, new.keys)
    safe = np.minimum(at, max(len(old_keys) - 1, 0))
    found = (at < len(old_keys)) & (old_keys[safe] == new.keys) if len(old_keys) else np.zeros(len(new.keys), bool)
    changed = ~found
    same_shape = old_rows.shape[1:] == new.rows.shape[1:]
    if same_shape and found.any():  # bitwise, so -0.0 vs 0.0 and NaN payloads count as changes
        changed[found] = (old_rows[safe[found]].view(np.uint32) != new.rows[found].view(np.uint32)).any(axis=1)
    else:
        changed[:] = True
    deleted = np.setdiff1d(old_keys, new.keys)
    return EmbeddingDelta(new.table, new.step, new.keys[changed], new.rows[changed], deleted, new.default_row)


@dataclass
class PushCounters:
    pushes: int = 0  # versions written to Redis
    full_pushes: int = 0  # ... of which without a base (every row written)
    rows_written: int = 0  # upserts + tombstones over all pushes
    pointer_moves: int = 0  # times serve:current moved
    failures: int = 0  # syncs that failed (Redis unreachable, a file unreadable): retried at the next sync
    last_error: str | None = field(default=None, compare=False)


class ServingPush:
    """Makes ``serve:current`` in Redis follow the publisher's ``CURRENT`` (module docstring)."""

    def __init__(self, client: Any, prefix: str, keep_versions: int = 3, expire_grace_s: int = 60) -> None:
        self.client = client
        self.keys = ServingKeys(prefix)
        self.keep_versions = keep_versions
        self.expire_grace_s = expire_grace_s
        self.counters = PushCounters()

    def sync(self, publisher: Publisher) -> bool:
        """Push CURRENT if Redis does not hold it complete, point serving at it and expire
        what fell out. False (logged, counted) when Redis or a file failed; nothing raises."""
        current = publisher.current()
        if current is None:
            return True
        try:
            if not self.complete(current.name) and not self._revive(current.name):
                self.push(current, publisher)
            if self.pointer() != current.name:
                self.client.set(self.keys.current, current.name)
                self.counters.pointer_moves += 1
            self._expire_old(current.name)
        except Exception as exc:  # noqa: BLE001 - Redis down, a file gone: the version on disk stands, retry later
            self.counters.failures += 1
            self.counters.last_error = f"{type(exc).__name__}: {exc}"
            log.error("serving push of %s to Redis failed (%s); the version on disk stands, the next sync retries",
                      current.name, exc, extra={"alert": "serving_push_failed", "version": current.name})
            return False
        return True

    def pointer(self) -> str | None:
        value = self.client.get(self.keys.current)
        return None if value is None else value.decode()

    def complete(self, version: str) -> bool:
        """In the set of kept versions (one that fell out may be expiring)."""
        return self.client.zscore(self.keys.versions, version) is not None

    def _revive(self, version: str) -> bool:
        """A version that fell out but has not expired yet (a rollback to it within the
        grace period): keep it again if every key is still there. Never rewritten in place —
        a reader may still be reading it."""
        manifest = self.client.get(self.keys.manifest(version))
        if manifest is None:
            return False
        names = self._names(version, orjson.loads(manifest)["tables"])
        pipe = self.client.pipeline(transaction=True)
        for name in names:
            pipe.persist(name)
        pipe.exists(*names)
        *_, present = pipe.execute()
        if present != len(names):
            return False  # partly expired: pushed again (nobody can still be reading it whole)
        self.client.zadd(self.keys.versions, {version: int(orjson.loads(manifest)["number"])})
        return True

    def _names(self, version: str, tables: dict[str, Any]) -> list[str]:
        """Every key of a complete version."""
        return [self.keys.manifest(version), *(k for t in tables for k in (self.keys.table(version, t),
                                                                            self.keys.default(version, t)))]

    def versions(self) -> list[str]:
        """Versions complete in Redis, oldest first."""
        return [v.decode() for v in self.client.zrange(self.keys.versions, 0, -1)]

    def push(self, version: PublishedVersion, publisher: Publisher) -> None:
        """Write ``version`` under its namespace: a delta against a version kept in Redis
        whose files are still on disk, else every row."""
        base = self._base(version, publisher)
        keys, client = self.keys, self.client
        tables: dict[str, dict[str, Any]] = {}
        rows_written = 0
        for name in table_names(version):
            new = read_parquet(version.path / table_file(name))
            target = keys.table(version.name, name)
            client.delete(target, keys.default(version.name, name))  # leftovers of a push that died (never read)
            old = None if base is None else read_parquet(base.path / table_file(name))
            # COPY finds nothing when the base table was empty (no hash) or lost: then every row goes
            if old is not None and (client.copy(keys.table(base.name, name), target, replace=True) or not len(old.keys)):
                delta = table_delta(old, new)
            else:
                delta = new
            push_to_redis(delta, client, target)
            client.expire(target, PARTIAL_TTL_S)  # until the manifest makes the version complete
            rows_written += len(delta.keys) + len(delta.deleted)
            tables[name] = {"key": target, "rows": int(len(new.keys)), "dim": int(new.default_row.shape[0]),
                            "step": new.step}
        manifest = {"version": version.name, "number": version.number,
                    "checkpoint": version.manifest.get("checkpoint"), "created": version.manifest.get("created"),
                    "samples": version.manifest.get("samples"),
                    "dense": str((version.path / DENSE_FILE).resolve()), "index": str((version.path / INDEX_FILE).resolve()),
                    "tables": tables, "base": None if base is None else base.name,
                    "pushed": "full" if base is None else "delta"}
        pipe = client.pipeline(transaction=True)  # the version becomes complete in one step
        for name in self._names(version.name, tables):
            pipe.persist(name)
        pipe.set(keys.manifest(version.name), orjson.dumps(manifest))
        pipe.zadd(keys.versions, {version.name: version.number})
        pipe.execute()
        self.counters.pushes += 1
        self.counters.full_pushes += base is None
        self.counters.rows_written += rows_written
        log.info("serving: %s in Redis (%s, %d rows written)", version.name, manifest["pushed"], rows_written,
                 extra={"version": version.name, "base": manifest["base"]})

    def _base(self, version: PublishedVersion, publisher: Publisher) -> PublishedVersion | None:
        """The kept version nearest in number (likely the smallest delta) whose files are
        still on disk and that has the same tables."""
        candidates = [v for v in map(publisher.version, self.versions())
                      if v is not None and v.name != version.name and table_names(v) == table_names(version)]
        return min(candidates, key=lambda v: (abs(v.number - version.number), -v.number), default=None)

    def _expire_old(self, pointed: str) -> None:
        """Versions beyond the newest ``keep_versions`` (never the one the pointer names)
        leave the set and expire after the grace period."""
        versions = self.versions()
        for name in versions[: max(0, len(versions) - self.keep_versions)]:
            if name == pointed:
                continue
            manifest = self.client.get(self.keys.manifest(name))
            tables = orjson.loads(manifest)["tables"] if manifest else {}
            pipe = self.client.pipeline(transaction=True)
            pipe.zrem(self.keys.versions, name)
            for key in self._names(name, tables):
                pipe.expire(key, self.expire_grace_s)
            pipe.execute()

    def status(self) -> dict[str, Any]:
        """What Redis serves now (for the demo summary and `publish list`)."""
        return {"current": self.pointer(), "versions": self.versions(), **vars(self.counters)}


def read_current(client: Any, prefix: str) -> tuple[str, dict[str, Any], dict[str, tuple[np.ndarray, np.ndarray]]] | None:
    """What a serving reader sees: the pointer read once, then that version's manifest and
    every row of every table ``(ids ascending, rows)``. None when nothing is published."""
    keys = ServingKeys(prefix)
    pointer = client.get(keys.current)
    if pointer is None:
        return None
    version = pointer.decode()
    manifest = orjson.loads(client.get(keys.manifest(version)))
    tables = {}
    for name, info in manifest["tables"].items():
        raw = client.hgetall(keys.table(version, name))
        ids = np.array(sorted(int(k) for k in raw), np.int64)
        rows = np.stack([np.frombuffer(raw[str(i).encode()], "<f4") for i in ids.tolist()]) if len(ids) else \
            np.zeros((0, info["dim"]), np.float32)
        tables[name] = (ids, rows)
    return version, manifest, tables
