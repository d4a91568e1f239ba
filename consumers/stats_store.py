"""Stream statistics snapshots in Redis: their fields, how they are computed from the merged
counts, and the one key layout that the stats worker writes and every reader reads
(``consumers/popularity.py``, online rankers). docs/architecture.md documents it for serving.

Layout (``P`` = the configured key prefix, ``n`` = the snapshot number)::

    P stats:seq                     INCR counter that numbers snapshots
    P stats:current                 n of the newest complete snapshot; moved last (one SET)
    P stats:<n>:meta                hash: format, clock_ms, written_unix, items, users, item_parts,
                                    user_parts, global_ctr, global_cvr, the window/decay settings,
                                    positions (JSON partition -> next offset), skipped (JSON reason -> n)
    P stats:<n>:item                hash: decimal id -> RECORD (point lookups)
    P stats:<n>:user                hash: decimal id -> RECORD
    P stats:<n>:item:ids:<k>        part k of the ids, int64 little-endian, ascending (bulk reads)
    P stats:<n>:item:values:<k>     part k of the records, float32 little-endian, (rows, len(FIELDS))
    P stats:<n>:user:ids:<k> ...    the same for users

RECORD is ``len(FIELDS)`` little-endian float32 in the order of :data:`FIELDS`. Every key
expires ``ttl_s`` after its snapshot was written; the previous snapshot's keys are cut to
``grace_s`` once the pointer has moved (a reader that read the old pointer still finds its
snapshot whole). A reader reads ``current`` once and then only keys of that snapshot, so it
never mixes two snapshots. When the worker stops, the pointer expires with the rest and
readers fall back to their own counts.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import orjson

from consumers.stats_state import Merged

FORMAT_VERSION: Final = 1
FIELDS: Final = (
    "exposures", "clicks", "conversions",  # windowed counts (exact integers)
    "exposures_decayed", "clicks_decayed", "conversions_decayed",  # decayed counts
    "rank",  # 1 = most exposures_decayed; ties share a rank (1 + ids with strictly more)
    "quantile",  # share of ids with strictly fewer exposures_decayed, in [0, 1)
    "ctr",  # (clicks_decayed + s * m) / (exposures_decayed + s), m = global CTR, s = CTR prior strength
    "cvr",  # (conversions_decayed + s' * m') / (clicks_decayed + s'), m' = global CVR, s' = CVR prior strength
)
COLUMN: Final = {name: i for i, name in enumerate(FIELDS)}
BLOB_ROWS: Final = 1 << 20  # ids per bulk part: 8 MiB of ids, 40 MiB of records, far under Redis's 512 MiB


@dataclass(frozen=True)
class StatsKeys:
    """Key names of the layout above, under ``prefix``."""

    prefix: str = "streamtrain:"

    @property
    def seq(self) -> str:
        return f"{self.prefix}stats:seq"

    @property
    def current(self) -> str:
        return f"{self.prefix}stats:current"

    def meta(self, n: int) -> str:
        return f"{self.prefix}stats:{n}:meta"

    def lookup(self, n: int, kind: str) -> str:
        return f"{self.prefix}stats:{n}:{kind}"

    def ids(self, n: int, kind: str, part: int) -> str:
        return f"{self.prefix}stats:{n}:{kind}:ids:{part}"

    def values(self, n: int, kind: str, part: int) -> str:
        return f"{self.prefix}stats:{n}:{kind}:values:{part}"


@dataclass(frozen=True)
class Priors:
    """The Beta priors of the smoothed rates: ``s`` pseudo-observations at the global mean."""

    ctr_strength: float
    default_ctr: float  # the global CTR while nothing was clicked
    cvr_strength: float
    default_cvr: float  # the global CVR while nothing converted


@dataclass(frozen=True)
class StatsTable:
    """One kind of ids: ``values[i]`` is the record of ``ids[i]``."""

    ids: np.ndarray  # (N,) int64, ascending
    values: np.ndarray  # (N, len(FIELDS)) float32

    def column(self, name: str) -> np.ndarray:
        return self.values[:, COLUMN[name]]

    def equals(self, other: StatsTable) -> bool:
        return np.array_equal(self.ids, other.ids) and np.array_equal(self.values, other.values)


@dataclass(frozen=True)
class StatsSnapshot:
    clock: int  # event time (ms) the counts are as of: the newest ts the worker had applied
    items: StatsTable
    users: StatsTable
    global_ctr: float
    global_cvr: float
    info: Mapping[str, Any] = field(default_factory=dict)  # positions, skipped, settings: for people, not readers

    def same_counts(self, other: StatsSnapshot) -> bool:
        """Same clock and the same records (what a reader would use; ``info`` aside)."""
        return (self.clock == other.clock and self.global_ctr == other.global_ctr
                and self.items.equals(other.items) and self.users.equals(other.users))


def _rates(window: np.ndarray, decayed: np.ndarray, ctr: float, cvr: float, priors: Priors) -> np.ndarray:
    """(N, len(FIELDS)) float32 records without rank/quantile (filled by the caller)."""
    out = np.zeros((len(window), len(FIELDS)), np.float64)
    out[:, 0:3], out[:, 3:6] = window, decayed
    exposures, clicks, conversions = decayed.T
    out[:, COLUMN["ctr"]] = (clicks + priors.ctr_strength * ctr) / (exposures + priors.ctr_strength)
    out[:, COLUMN["cvr"]] = (conversions + priors.cvr_strength * cvr) / (clicks + priors.cvr_strength)
    return out


def _ranked(values: np.ndarray) -> np.ndarray:
    """Fill rank and quantile from one sort: in ascending order, an id's tie run starts at
    the count of ids strictly below it and ends at the count at or below it."""
    popularity = values[:, COLUMN["exposures_decayed"]]
    n = len(popularity)
    order = np.argsort(popularity, kind="stable")
    ordered = popularity[order]
    index = np.arange(n)
    starts = np.r_[True, ordered[1:] != ordered[:-1]] if n else np.zeros(0, bool)
    below = np.maximum.accumulate(np.where(starts, index, 0))  # first index of each run
    ends = np.r_[ordered[1:] != ordered[:-1], True] if n else np.zeros(0, bool)
    at_or_below = np.minimum.accumulate(np.where(ends, index, n - 1)[::-1])[::-1] + 1
    values[order, COLUMN["rank"]] = 1 + n - at_or_below
    values[order, COLUMN["quantile"]] = below / max(n, 1)
    return values.astype(np.float32)


def build_snapshot(items: Merged, users: Merged, priors: Priors, info: Mapping[str, Any] | None = None) -> StatsSnapshot:
    """Records of every item and user. The global means come from the items (every event
    has one), so a user's and an item's priors shrink towards the same CTR."""
    exposures, clicks, conversions = items.decayed.sum(axis=0) if len(items.ids) else (0.0, 0.0, 0.0)
    ctr = float(clicks / exposures) if clicks > 0 and exposures > 0 else priors.default_ctr
    cvr = float(conversions / clicks) if conversions > 0 and clicks > 0 else priors.default_cvr
    tables = [StatsTable(m.ids, _ranked(_rates(m.window, m.decayed, ctr, cvr, priors))) for m in (items, users)]
    return StatsSnapshot(items.clock, tables[0], tables[1], ctr, cvr, dict(info or {}))


# ---------------------------------------------------------------------------- Redis
def write_snapshot(client: Any, keys: StatsKeys, snapshot: StatsSnapshot, ttl_s: int, grace_s: int,
                   chunk: int = 20_000) -> int:
    """Write ``snapshot`` under a new number, then move ``current`` to it and cut the
    previous snapshot's keys to ``grace_s``; returns the number. Pipelined; the per-id
    hashes are filled ``chunk`` ids per script call (each blocks Redis ~10-20 ms). Redis
    errors propagate (the caller counts and retries)."""
    n = int(client.incr(keys.seq))
    parts: dict[str, int] = {}
    for kind, table in (("item", snapshot.items), ("user", snapshot.users)):
        parts[kind] = _write_table(client, keys, n, kind, table, ttl_s, chunk)
    meta = {"format": FORMAT_VERSION, "clock_ms": snapshot.clock, "written_unix": time.time(),
            "items": len(snapshot.items.ids), "users": len(snapshot.users.ids),
            "item_parts": parts["item"], "user_parts": parts["user"],
            "global_ctr": repr(snapshot.global_ctr), "global_cvr": repr(snapshot.global_cvr),
            **{k: v if isinstance(v, (int, float, str)) else orjson.dumps(v).decode() for k, v in snapshot.info.items()}}
    pipe = client.pipeline(transaction=False)
    pipe.hset(keys.meta(n), mapping=meta)
    pipe.expire(keys.meta(n), ttl_s)
    pipe.execute()
    previous = client.set(keys.current, n, ex=ttl_s, get=True)  # everything of n is written: readers may switch
    if previous is not None and int(previous) != n:
        _cut(client, keys, int(previous), grace_s)
    return n


# Expands one chunk of a table into its per-id hash inside Redis: the ids as decimal text
# separated by ",", the records as one blob. One call per chunk instead of two encoded
# arguments per id on the client (1M items: 3.6 s instead of 9.7 s, docs/benchmarks.md).
_HSET_RECORDS = """
local key, names, records, size = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local args, i = {}, 0
for name in string.gmatch(names, "[^,]+") do
  args[#args + 1] = name
  args[#args + 1] = string.sub(records, i * size + 1, (i + 1) * size)
  i = i + 1
  if #args >= 2000 then redis.call("HSET", key, unpack(args)); args = {} end
end
if #args > 0 then redis.call("HSET", key, unpack(args)) end
redis.call("EXPIRE", key, ARGV[4])
return i
"""


def _write_table(client: Any, keys: StatsKeys, n: int, kind: str, table: StatsTable, ttl_s: int, chunk: int) -> int:
    records = np.ascontiguousarray(table.values, "<f4")
    size = records.itemsize * records.shape[1]
    names = table.ids.astype(str)
    expand = client.register_script(_HSET_RECORDS)
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(names), chunk):
        rows = slice(start, start + chunk)
        expand(keys=[keys.lookup(n, kind)], args=[",".join(names[rows].tolist()), records[rows].tobytes(), size, ttl_s],
               client=pipe)
    count = max(1, -(-len(names) // BLOB_ROWS))  # at least one (empty) part: readers need not special-case
    for part in range(count):
        rows = slice(part * BLOB_ROWS, (part + 1) * BLOB_ROWS)
        pipe.set(keys.ids(n, kind, part), np.ascontiguousarray(table.ids[rows], "<i8").tobytes(), ex=ttl_s)
        pipe.set(keys.values(n, kind, part), records[rows].tobytes(), ex=ttl_s)
    pipe.execute()
    return count


def _cut(client: Any, keys: StatsKeys, n: int, grace_s: int) -> None:
    """Let snapshot ``n`` expire ``grace_s`` from now (never later than it would have)."""
    parts = client.hmget(keys.meta(n), ["item_parts", "user_parts"])
    names = [keys.meta(n), keys.lookup(n, "item"), keys.lookup(n, "user")]
    for kind, count in zip(("item", "user"), parts):
        for part in range(int(count or 0)):
            names += [keys.ids(n, kind, part), keys.values(n, kind, part)]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.expire(name, grace_s, lt=True)
    pipe.execute()


def read_snapshot(client: Any, keys: StatsKeys) -> StatsSnapshot | None:
    """The current snapshot in bulk, or None when there is none (never written, expired, or
    cut between reading the pointer and its parts). Redis errors propagate."""
    current = client.get(keys.current)
    if current is None:
        return None
    n = int(current)
    meta = {k.decode(): v.decode() for k, v in client.hgetall(keys.meta(n)).items()}
    if not meta:
        return None
    if int(meta["format"]) != FORMAT_VERSION:
        raise ValueError(f"stats snapshot {n}: format {meta['format']}, expected {FORMAT_VERSION}")
    tables = []
    for kind in ("item", "user"):
        count = int(meta[f"{kind}_parts"])
        pipe = client.pipeline(transaction=False)
        for part in range(count):
            pipe.get(keys.ids(n, kind, part))
            pipe.get(keys.values(n, kind, part))
        blobs = pipe.execute()
        if any(b is None for b in blobs):
            return None
        ids = np.concatenate([np.frombuffer(b, "<i8") for b in blobs[0::2]]).astype(np.int64)
        values = np.concatenate([np.frombuffer(b, "<f4") for b in blobs[1::2]]).astype(np.float32)
        tables.append(StatsTable(ids, values.reshape(len(ids), len(FIELDS))))
    info: dict[str, Any] = {k: orjson.loads(v) if v[:1] in ("{", "[") else v for k, v in meta.items()
                            if k not in ("clock_ms", "global_ctr", "global_cvr")}  # objects were written as JSON
    return StatsSnapshot(int(meta["clock_ms"]), tables[0], tables[1], float(meta["global_ctr"]),
                         float(meta["global_cvr"]), info)
