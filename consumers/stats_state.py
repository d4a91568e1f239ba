"""Event-time counts of the stream statistics worker, per id: windowed and decayed. No Kafka,
no Redis, no clocks.

Definitions (everything on event time; T, the *clock*, is the largest ts applied)
---------------------------------------------------------------------------------
For an id (an item or a user) and each event type (exposure, click, convert):

* **windowed count** at T: its events whose bucket ``ts // bucket_ms`` lies in
  ``(T // bucket_ms - window_buckets, T // bucket_ms]`` — a sliding window of
  ``window_buckets`` whole buckets ending with the bucket of T;
* **decayed count** at T: ``sum 2 ** (-(T - ts) / half_life_ms)`` over its events;
* an id whose newest event is older than ``T - forget_after_ms`` is left out (and its row
  is dropped, see :meth:`PartialCounts.expire`).

Rows are *partials*: one per (source partition, id). Faust writes a table's changelog to
the partition of the event being processed and recovers a worker's tables partition by
partition, so a row updated from two source partitions would have two histories and
recovery would keep whichever partition it read last. Users never span partitions (the
message key is the user id), items always do; a snapshot sums an id's partials
(:meth:`PartialCounts.merged`). The alternative — re-keying every event by item through a
repartition topic — doubles the broker traffic and puts an at-least-once hop between the
source offsets and the counts.

Exactly-once effect. Every row keeps the highest source offset applied to it, and an event
at or below it is skipped: re-reading a partition from any earlier position (a restart
from committed offsets, a rewind after recovering a shorter changelog) changes nothing it
already counted. Per source partition, :attr:`PartialCounts.progress` is the next offset
whose events are all reflected; the worker writes it to the changelog after the rows of
each step, so any prefix of the changelog is a consistent state to resume from
(``consumers/stats_app.py``).

Floating point: windowed counts are exact integers. Decayed counts fold each step's
events into the row's value at its newest ts, so they depend on how events were grouped
into steps at the last bit (float64 rounding, ~1e-15 relative), never more.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from consumers.config import StatsConfig
from consumers.schema import Action

KEY_DTYPE = np.dtype([("partition", "<i4"), ("id", "<i8")])  # 12 bytes: the changelog key of a row
PROGRESS_ID = 0  # the row of id 0 holds a partition's progress (hash_id never returns 0)
_EMPTY = -1  # offset of a row nothing was applied to yet
_COLUMN = np.full(max(Action) + 1, -1, np.int64)  # Action code -> column of the counts
_COLUMN[[Action.EXPOSURE, Action.CLICK, Action.CONVERT]] = [0, 1, 2]


def record_dtype(window_buckets: int) -> np.dtype:
    """One row's changelog value: little-endian, fixed size (56 + 12 * window_buckets bytes)."""
    return np.dtype([("offset", "<i8"),  # highest source offset applied (-1: none)
                     ("ref", "<i8"),  # newest ts applied: the decayed counts are as of this time
                     ("bucket", "<i8"),  # ref // bucket_ms: window[:, 0] is this bucket, window[:, j] bucket - j
                     ("decayed", "<f8", (3,)),  # exposures, clicks, conversions decayed to ref
                     ("window", "<i4", (window_buckets, 3))])


@dataclass(frozen=True)
class Merged:
    """Counts of one kind of id at one clock, partials summed: ids ascending."""

    clock: int  # T, ms
    ids: np.ndarray  # (N,) int64, ascending
    window: np.ndarray  # (N, 3) int64: exposures, clicks, conversions in the window ending at T
    decayed: np.ndarray  # (N, 3) float64: the same decayed to T


class PartialCounts:
    """Rows keyed by (source partition, id) for one kind of id (items or users)."""

    def __init__(self, config: StatsConfig, initial: int = 1024) -> None:
        self.config = config
        self.dtype = record_dtype(config.window_buckets)
        self.progress: dict[int, int] = {}  # partition -> next offset whose events are all applied
        self.clock: dict[int, int] = {}  # partition -> max ts applied
        self._rows: dict[int, dict[int, int]] = {}  # partition -> id -> row
        self._free: list[int] = []
        self._size = 0
        self._alloc(initial)

    # ------------------------------------------------------------------ storage
    def _alloc(self, rows: int) -> None:
        n = self.config.window_buckets
        self.partition = np.zeros(rows, np.int32)
        self.ids = np.zeros(rows, np.int64)  # 0 = free row
        self.offset = np.full(rows, _EMPTY, np.int64)
        self.ref = np.zeros(rows, np.int64)
        self.bucket = np.zeros(rows, np.int64)
        self.decayed = np.zeros((rows, 3), np.float64)
        self.window = np.zeros((rows, n, 3), np.int32)
        self._free = list(range(rows - 1, -1, -1))

    def _grow(self) -> None:
        old = len(self.ids)
        columns = ("partition", "ids", "offset", "ref", "bucket", "decayed", "window")
        kept = {name: getattr(self, name) for name in columns}
        self._alloc(2 * old)
        for name, values in kept.items():
            getattr(self, name)[:old] = values
        self._free = list(range(2 * old - 1, old - 1, -1))

    def __len__(self) -> int:
        return self._size

    def rows_of(self, partition: int, ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` in ``partition``, created (empty) where missing."""
        table = self._rows.setdefault(partition, {})
        out = np.empty(len(ids), np.int64)
        for i, key in enumerate(ids.tolist()):
            row = table.get(key)
            if row is None:
                if not self._free:
                    self._grow()
                row = table[key] = self._free.pop()
                self.partition[row], self.ids[row], self.offset[row] = partition, key, _EMPTY
                self.ref[row] = self.bucket[row] = 0
                self.decayed[row] = 0.0
                self.window[row] = 0
                self._size += 1
            out[i] = row
        return out

    # ------------------------------------------------------------------ updates
    def apply(self, partition: int, offsets: np.ndarray, ids: np.ndarray, etype: np.ndarray,
              ts: np.ndarray) -> tuple[np.ndarray, int]:
        """Count one partition's events (1-D, ascending offsets). Returns the rows that
        changed and how many events were skipped as already applied."""
        rows = self.rows_of(partition, ids)
        fresh = offsets > self.offset[rows]
        skipped = int((~fresh).sum())
        rows, offsets, ts, kind = rows[fresh], offsets[fresh], ts[fresh], _COLUMN[etype[fresh]]
        if not len(rows):
            return rows, skipped
        touched, inverse = np.unique(rows, return_inverse=True)
        cfg = self.config
        empty = self.offset[touched] == _EMPTY
        ref_old = self.ref[touched]
        ref = np.where(empty, np.iinfo(np.int64).min, ref_old)
        np.maximum.at(ref, inverse, ts)  # (U,) newest ts per row
        # decayed: the old value aged to the new ref, plus each event's weight at that ref
        age = np.where(empty, 0.0, np.exp2(-(ref - ref_old) / cfg.half_life_ms))
        decayed = self.decayed[touched] * age[:, None]
        np.add.at(decayed, (inverse, kind), np.exp2(-(ref[inverse] - ts) / cfg.half_life_ms))
        # window: shift the buckets to the new newest one, then add the events that still fit
        n = cfg.window_buckets
        bucket = ref // cfg.bucket_ms
        shift = np.where(empty, n, bucket - self.bucket[touched])
        source = np.arange(n)[None, :] - shift[:, None]  # (U, n) old column feeding each new column
        valid = source >= 0
        window = np.where(valid[..., None], self.window[touched][np.arange(len(touched))[:, None],
                                                               np.where(valid, source, 0)], 0)
        age_buckets = bucket[inverse] - ts // cfg.bucket_ms
        inside = age_buckets < n
        np.add.at(window, (inverse[inside], age_buckets[inside], kind[inside]), 1)
        newest = np.full(len(touched), _EMPTY, np.int64)
        np.maximum.at(newest, inverse, offsets)
        self.offset[touched], self.ref[touched], self.bucket[touched] = newest, ref, bucket
        self.decayed[touched], self.window[touched] = decayed, window
        self.clock[partition] = max(self.clock.get(partition, int(ts.max())), int(ts.max()))
        return touched, skipped

    def expire(self) -> np.ndarray:
        """Drop rows whose newest event is ``forget_after_ms`` older than their partition's
        clock (they are out of the window and weigh < 2^-(forget/half-life)); returns their
        rows' keys (``KEY_DTYPE``) for the changelog's tombstones."""
        used = np.flatnonzero(self.ids)
        clock = np.zeros(max(self.clock, default=0) + 1, np.int64)
        clock[list(self.clock)] = list(self.clock.values())
        old = used[self.ref[used] < clock[self.partition[used]] - self.config.forget_after_ms]
        keys = self.keys(old)
        for row, partition, key in zip(old.tolist(), self.partition[old].tolist(), self.ids[old].tolist()):
            del self._rows[partition][key]
            self.ids[row] = 0
            self._free.append(row)
        self._size -= len(old)
        return keys

    def drop_partitions(self, partitions: set[int]) -> None:
        """Forget partitions this worker no longer owns (a rebalance took them)."""
        for partition in partitions:
            rows = np.array(list(self._rows.pop(partition, {}).values()), np.int64)
            self.ids[rows] = 0
            self._free.extend(rows.tolist())
            self._size -= len(rows)
            self.progress.pop(partition, None)
            self.clock.pop(partition, None)

    # ------------------------------------------------------------------ changelog
    def keys(self, rows: np.ndarray) -> np.ndarray:
        keys = np.empty(len(rows), KEY_DTYPE)
        keys["partition"], keys["id"] = self.partition[rows], self.ids[rows]
        return keys

    def records(self, rows: np.ndarray) -> np.ndarray:
        """The changelog values of ``rows`` (``self.dtype``)."""
        out = np.empty(len(rows), self.dtype)
        out["offset"], out["ref"], out["bucket"] = self.offset[rows], self.ref[rows], self.bucket[rows]
        out["decayed"], out["window"] = self.decayed[rows], self.window[rows]
        return out

    def progress_record(self, partition: int) -> tuple[np.ndarray, np.ndarray]:
        """(key, value) of the partition's progress row: the value's offset is the next
        offset to read; its other fields are zero."""
        key = np.zeros(1, KEY_DTYPE)
        key["partition"] = partition
        value = np.zeros(1, self.dtype)
        value["offset"] = self.progress[partition]
        return key, value

    def load(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Replace the rows of every partition in ``keys`` by these records (recovered
        from the changelog: the last record per key). Progress rows set ``progress``."""
        for partition in np.unique(keys["partition"]).tolist():
            self.drop_partitions({partition})
        is_progress = keys["id"] == PROGRESS_ID
        for key, value in zip(keys[is_progress].tolist(), values[is_progress]["offset"].tolist()):
            self.progress[key[0]] = value
        keys, values = keys[~is_progress], values[~is_progress]
        for partition in np.unique(keys["partition"]).tolist():
            mine = keys["partition"] == partition
            rows = self.rows_of(partition, keys["id"][mine])
            got = values[mine]
            self.offset[rows], self.ref[rows], self.bucket[rows] = got["offset"], got["ref"], got["bucket"]
            self.decayed[rows], self.window[rows] = got["decayed"], got["window"]
            self.clock[partition] = int(got["ref"].max())

    # ------------------------------------------------------------------ snapshot
    @property
    def max_clock(self) -> int | None:
        """T of a snapshot: the largest ts applied over every partition (None: nothing yet)."""
        return max(self.clock.values(), default=None)

    def merged(self, clock: int) -> Merged:
        """Every id's counts at ``clock`` (module docstring), its partials summed."""
        cfg = self.config
        # Rows are handed out lowest first: work on views of the used prefix, not on gathered copies.
        top = int(np.flatnonzero(self.ids)[-1]) + 1 if self._size else 0
        live = (self.ids[:top] != 0) & (self.ref[:top] >= clock - cfg.forget_after_ms)  # (R,)
        # Bucket j of a row holds its bucket - j; at T it is in the window while j < n - shift.
        kept = np.where(live, cfg.window_buckets - (clock // cfg.bucket_ms - self.bucket[:top]), 0)  # (R,)
        inside = (np.arange(cfg.window_buckets)[None, :] < kept[:, None]).astype(np.int32)  # (R, n)
        window = np.einsum("rnk,rn->rk", self.window[:top], inside)[live].astype(np.int64)  # (R', 3), one pass
        decayed = (self.decayed[:top] * np.exp2(-(clock - self.ref[:top]) / cfg.half_life_ms)[:, None])[live]
        used = np.flatnonzero(live)
        ids, inverse = np.unique(self.ids[used], return_inverse=True)
        sums = [np.bincount(inverse, weights=col, minlength=len(ids)) for col in (*window.T, *decayed.T)]
        return Merged(clock, ids, np.stack(sums[:3], axis=1).round().astype(np.int64), np.stack(sums[3:], axis=1))
