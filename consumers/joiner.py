"""The event-time label joiner: events in, finished samples out. No Kafka, no clocks.

How it works
------------
1. ``ingest(events)`` drops duplicates (per-partition id window) and events below the
   watermark (``too_late``), and stages the rest in a reorder buffer. An event is too
   late when its ts is below ``max(partition watermark, joiner watermark)``, where the
   partition watermark is the max ts seen so far *in that partition* minus
   ``allowed_lateness_ms``: a function of the partition's own message order only.
2. ``advance()`` raises the joiner watermark to the minimum of the partition watermarks
   of all assigned partitions (DESIGN §6.1; it never goes down), finalises the staged
   events below it in canonical order ``(ts, type, event-id hash)`` and emits every
   sample whose windows closed.
3. Finalising walks the events in segments of one ``stats_refresh_ms`` bucket each.
   Per segment: exposures open pending samples, clicks/conversions attach labels (or are
   rejected as orphans / out of window), every exposure gets its history prefix, time
   features, rank package, negatives and priors, then the segment's accepted events
   join the user histories and popularity counters. When a segment starts a new bucket,
   popularity/item-pool snapshots are taken and over-capacity users/items are evicted.

Labels: a click counts when ``exposure.ts <= click.ts <= exposure.ts + click_window_ms``;
a conversion when a click is attached and ``click.ts <= convert.ts <= click.ts +
convert_window_ms``. ``wait`` emits an unclicked sample at ``ts + click_window_ms`` and
a clicked one at ``click_ts + convert_window_ms``; ``emit_then_correct`` emits every
sample at ``ts + click_window_ms``; a conversion later than that (in event time) re-emits
it with ``convert=1, is_correction=True``, at the conversion's ts.

Determinism: samples are emitted in order of ``(emit time, ts, sample_id,
is_correction)`` where the emit time is the window close (or the conversion ts of a
correction). Every emission at an ``advance`` has an emit time in
``[previous watermark, watermark)``, so the concatenated output is one globally sorted
sequence, and every feature is a function of event time. Together: the sample stream is
a pure function of each partition's message sequence — independent of how partitions
interleave, how input was batched and when ``advance`` ran. Only the overload valves
(``max_pending_samples``, ``max_buffered_events``) and a changing partition assignment
can break that; they are counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from consumers.config import JoinerConfig
from consumers.decode import EventBatch
from consumers.dedupe import PartitionedDedupe
from consumers.history import HistoryView, UserHistory
from consumers.negatives import ItemPool, rank_package
from consumers.pending import SamplePool
from consumers.popularity import PopularitySource
from consumers.reasons import Reason, Rejection
from consumers.schema import Action, SampleBatch, concat_batches, empty_batch
from consumers.state import pack_bytes, unpack_bytes
from consumers.timefeatures import GapBuckets, calendar

FORMAT_VERSION = 1
NO_WATERMARK = -(2**63)
END_OF_TIME = 2**63 - 1
_NO_TS = -(2**62)  # "no event yet" for a partition max; minus any lateness it stays above int64 min

_EXPOSURE, _CLICK, _CONVERT = int(Action.EXPOSURE), int(Action.CLICK), int(Action.CONVERT)

COUNTERS = (
    "events_accepted",  # staged for the join
    "duplicates",  # dropped by the dedupe window (not DLQ'd: idempotence is normal)
    "samples_emitted",  # rows emitted, corrections included
    "corrections_emitted",  # emit_then_correct re-emissions
    "forced_emissions",  # samples emitted early because max_pending_samples was hit
    "forced_watermark_advances",  # times max_buffered_events pushed the watermark
    "conversion_waits_expired",  # emit_then_correct samples whose conversion never came
)


@dataclass(slots=True)
class Emission:
    samples: SampleBatch
    rejections: list[Rejection] = field(default_factory=list)


class _Emitted:
    """Samples emitted during one advance, gathered at once (their pool rows may be
    reused right after), with their emit times for the final ordering."""

    def __init__(self, pool: SamplePool) -> None:
        self._pool = pool
        self.batches: list[SampleBatch] = []
        self.emit_time: list[np.ndarray] = []

    def add(self, rows: np.ndarray, emit_time: np.ndarray, correction: bool) -> None:
        if not len(rows):
            return
        batch = self._pool.gather(rows)
        batch["is_correction"] = np.full(len(rows), correction)
        if correction:
            batch["convert"][:] = 1
        self.batches.append(batch)
        self.emit_time.append(emit_time)


class LabelJoiner:
    def __init__(self, config: JoinerConfig, popularity: PopularitySource) -> None:
        self.config = config
        self.popularity = popularity
        self.L = config.history_len
        self.S = len(config.sparse_features)
        self.D = len(config.dense_features)
        self.K = config.num_random_negatives
        self.history = UserHistory(self.L, config.max_history_users)
        self.pool = SamplePool(self.L, self.K, self.S, self.D)
        self.item_pool = ItemPool(config.item_pool_size)
        self.dedupe = PartitionedDedupe(config.dedupe_window)
        self.gaps = GapBuckets(config.gap_bucket_edges_ms)
        self.watermark = NO_WATERMARK
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._index: dict[int, int] = {}  # join key -> pool row of the latest exposure with that key
        self._staged: list[EventBatch] = []
        self._staged_count = 0
        self._partition_max: dict[int, int] = {}  # max accepted ts per partition
        self._assigned: set[int] = set()
        self._bucket: int | None = None  # stats_refresh_ms bucket of the last finalised segment

    # ---------------------------------------------------------------- partitions
    def assign(self, partitions: list[int]) -> None:
        """Partitions now consumed: their watermarks hold the joiner's back until they
        have seen an event."""
        self._assigned.update(partitions)

    def revoke(self, partitions: list[int]) -> None:
        """Partitions no longer consumed: they stop holding the watermark back. Their
        pending samples stay and are emitted as the watermark moves."""
        self._assigned.difference_update(partitions)

    @property
    def partition_watermarks(self) -> dict[int, int | None]:
        """Per assigned partition: max event ts seen minus lateness (None before its first
        event). The joiner's ``watermark`` follows their minimum; export both as metrics."""
        lateness = self.config.allowed_lateness_ms
        return {p: (None if p not in self._partition_max else self._partition_max[p] - lateness)
                for p in sorted(self._assigned)}

    @property
    def pending(self) -> int:
        """Samples opened and not yet released (bounded by ``max_pending_samples``)."""
        return len(self.pool)

    @property
    def buffered(self) -> int:
        """Events in the reorder buffer (bounded by ``max_buffered_events``)."""
        return self._staged_count

    # ---------------------------------------------------------------- ingest
    def ingest(self, events: EventBatch) -> list[Rejection]:
        """Stage decoded events (message order). Returns the too-late rejections."""
        if not len(events):
            return []
        lateness = self.config.allowed_lateness_ms
        keep = np.zeros(len(events), np.bool_)
        rejections: list[Rejection] = []
        duplicates = 0
        for p in np.unique(events.partition).tolist():
            self._assigned.add(p)
            rows = np.flatnonzero(events.partition == p)
            ts = events.ts[rows]
            # The partition max before each event. Duplicates and too-late events never
            # exceed it, so a plain running max over all events is the accepted-only one.
            top = self._partition_max.get(p, _NO_TS)
            running = np.maximum.accumulate(ts)
            before = np.empty_like(running)
            before[0] = top
            np.maximum(running[:-1], top, out=before[1:])
            floor = np.maximum(before - lateness, self.watermark)
            late = ts < floor
            for i, f in zip(rows[late].tolist(), floor[late].tolist()):
                rejections.append(Rejection(Reason.TOO_LATE, f"ts {int(events.ts[i])} < watermark {f}",
                                            events.raw[i], p, int(events.offset[i])))
            window = self.dedupe.window(p)
            seen, order, capacity = window.seen, window.order, window.capacity
            on_time = rows[~late]
            accepted = []
            for i, eid in zip(on_time.tolist(), events.eid[on_time].tolist()):
                if eid in seen:
                    duplicates += 1
                    continue
                seen.add(eid)  # DedupeWindow.add, inlined: this loop runs once per event
                order.append(eid)
                if len(order) > capacity:
                    seen.discard(order.popleft())
                accepted.append(i)
            keep[accepted] = True
            self._partition_max[p] = max(top, int(running[-1]))
        staged = events.take(keep)
        staged.raw[staged.etype == _EXPOSURE] = None  # exposures are never DLQ'd later
        if len(staged):
            self._staged.append(staged)
            self._staged_count += len(staged)
        self.counters["duplicates"] += duplicates
        self.counters["events_accepted"] += len(staged)
        return rejections

    # ---------------------------------------------------------------- advance
    def advance(self) -> Emission:
        """Move the watermark as far as the assigned partitions allow; finalise and emit."""
        target = self.watermark
        if self._assigned and all(p in self._partition_max for p in self._assigned):
            target = max(target, min(self._partition_max[p] for p in self._assigned) - self.config.allowed_lateness_ms)
        if self._staged_count > self.config.max_buffered_events:
            all_ts = np.concatenate([b.ts for b in self._staged])
            excess = self._staged_count - self.config.max_buffered_events
            forced = int(np.partition(all_ts, excess - 1)[excess - 1]) + 1
            if forced > target:
                target = forced
                self.counters["forced_watermark_advances"] += 1
        return self._advance_to(target)

    def flush(self) -> Emission:
        """End of input (bounded replays, tests): finalise everything and emit every
        pending sample with the labels it has. Later events will all be too late."""
        return self._advance_to(END_OF_TIME)

    def _advance_to(self, target: int) -> Emission:
        rejections: list[Rejection] = []
        emitted = _Emitted(self.pool)
        if target > self.watermark:
            self.watermark = target
            rejections = self._finalise(target, emitted)
            self._emit_closed(target, emitted)
        self._enforce_pending_cap(emitted)
        return Emission(self._assemble(emitted), rejections)

    # ---------------------------------------------------------------- finalise
    def _finalise(self, watermark: int, emitted: _Emitted) -> list[Rejection]:
        if not self._staged:
            return []
        staged = EventBatch.concat(self._staged) if len(self._staged) > 1 else self._staged[0]
        ready = staged.ts < watermark
        rest = staged.take(~ready)
        self._staged = [rest] if len(rest) else []
        self._staged_count = len(rest)
        events = staged.take(ready)
        if not len(events):
            return []
        # Partition and offset break the last ties, so the order never depends on arrival.
        events = events.take(np.lexsort((events.offset, events.partition, events.eid, events.etype, events.ts)))
        bucket = events.ts // self.config.stats_refresh_ms
        cuts = [0, *(np.flatnonzero(np.diff(bucket)) + 1).tolist(), len(events)]
        rejections: list[Rejection] = []
        for start, stop in zip(cuts, cuts[1:]):
            b = int(bucket[start])
            if self._bucket is not None and b > self._bucket:
                self._refresh()
            self._bucket = b
            rejections += self._segment(events.take(slice(start, stop)), emitted)
        return rejections

    def _refresh(self) -> None:
        """An event-time boundary: everything before it has been finalised."""
        self.history.evict_over_capacity()
        self.popularity.refresh()
        self.item_pool.refresh()

    def _segment(self, ev: EventBatch, emitted: _Emitted) -> list[Rejection]:
        is_exposure = ev.etype == _EXPOSURE
        exp_idx = np.flatnonzero(is_exposure)
        rows = self.pool.alloc(len(exp_idx))
        self._open(rows, ev.take(exp_idx))
        row_of = np.full(len(ev), -1, np.int64)
        row_of[exp_idx] = rows
        push = np.ones(len(ev), np.bool_)
        rejections = self._join_labels(ev, row_of, push, emitted)
        hot = self.popularity.item_popularity(ev.item) > self.popularity.hot_threshold()
        view = self.history.query_then_append(ev.user, ev.ts, ev.item, ev.etype, hot, is_exposure, push)
        self._features(rows, ev.take(exp_idx), view)
        self.popularity.observe(ev.user[push], ev.item[push], ev.etype[push], ev.ts[push])
        self.item_pool.observe(ev.item[exp_idx])
        return rejections

    def _open(self, rows: np.ndarray, exp: EventBatch) -> None:
        """Write the event-given fields of new pending samples."""
        c = self.pool.cols
        c["sample_id"][rows] = exp.eid
        c["user"][rows] = exp.user
        c["item"][rows] = exp.item
        c["ts"][rows] = exp.ts
        c["partition"][rows] = exp.partition
        c["offset"][rows] = exp.offset
        c["sparse"][rows] = exp.sparse
        c["dense"][rows] = exp.dense
        c["click"][rows] = 0
        c["convert"][rows] = 0
        c["is_correction"][rows] = False
        c["key"][rows] = exp.key
        c["click_ts"][rows] = -1
        c["emit_at"][rows] = exp.ts + self.config.click_window_ms
        c["closes_at"][rows] = exp.ts + self.config.click_window_ms
        c["emitted"][rows] = False
        c["late_convert"][rows] = False
        c["indexed"][rows] = True

    def _join_labels(self, ev: EventBatch, row_of: np.ndarray, push: np.ndarray, emitted: _Emitted) -> list[Rejection]:
        """Walk the segment in canonical order: exposures claim their join key, clicks and
        conversions attach to the latest exposure holding theirs. Rejected events are
        cleared in ``push`` (they enter neither history nor popularity)."""
        cfg = self.config
        c = self.pool.cols
        exp_ts, click_ts, click, convert, emit_at, closes_at, late_convert, indexed = (
            c["ts"], c["click_ts"], c["click"], c["convert"], c["emit_at"], c["closes_at"], c["late_convert"], c["indexed"])
        wait = cfg.policy == "wait"
        index = self._index
        rejections: list[Rejection] = []
        corrections: list[int] = []
        correction_ts: list[int] = []
        for i, (etype, key, ts, row) in enumerate(zip(ev.etype.tolist(), ev.key.tolist(), ev.ts.tolist(), row_of.tolist())):
            if etype == _EXPOSURE:
                previous = index.get(key)
                if previous is not None:
                    indexed[previous] = False
                index[key] = row
                continue
            row = index.get(key)
            if row is not None and ts > closes_at[row]:
                row = None  # closed in event time; may still sit here until this advance ends
            reason = None
            if row is None:
                reason = Reason.ORPHAN_CLICK if etype == _CLICK else Reason.ORPHAN_CONVERT
                detail = "no open exposure for (request_id, item_id)"
            elif etype == _CLICK:
                start = int(exp_ts[row])
                if not start <= ts <= start + cfg.click_window_ms:
                    reason = Reason.CLICK_OUTSIDE_WINDOW
                    detail = f"click {ts - start} ms after its exposure, window {cfg.click_window_ms}"
                elif click_ts[row] < 0:
                    click_ts[row] = ts
                    click[row] = 1
                    wait_until = ts + cfg.convert_window_ms
                    if wait:
                        emit_at[row] = closes_at[row] = wait_until
                    else:
                        closes_at[row] = max(int(closes_at[row]), wait_until)
            else:
                clicked_at = int(click_ts[row])
                if clicked_at < 0 or ts < clicked_at:
                    reason = Reason.CONVERT_WITHOUT_CLICK
                    detail = "no click at or before the conversion"
                elif ts > clicked_at + cfg.convert_window_ms:
                    reason = Reason.CONVERT_OUTSIDE_WINDOW
                    detail = f"conversion {ts - clicked_at} ms after its click, window {cfg.convert_window_ms}"
                elif convert[row] or late_convert[row]:
                    pass  # a second conversion changes nothing
                elif wait or ts <= emit_at[row]:
                    convert[row] = 1  # before the (first) emission, in event time
                    if not wait:
                        closes_at[row] = emit_at[row]  # nothing left to wait for
                else:
                    # emit_then_correct, after the first emission in event time (whether or
                    # not that emission physically happened yet): a correction, now
                    late_convert[row] = True
                    closes_at[row] = ts
                    corrections.append(row)
                    correction_ts.append(ts)
            if reason is not None:
                push[i] = False
                rejections.append(Rejection(reason, detail, ev.raw[i], int(ev.partition[i]), int(ev.offset[i])))
        if corrections:
            emitted.add(np.array(corrections, np.int64), np.array(correction_ts, np.int64), correction=True)
        return rejections

    def _features(self, rows: np.ndarray, exp: EventBatch, view: HistoryView) -> None:
        """History prefix, time features, rank package, negatives and priors of new samples."""
        c = self.pool.cols
        cfg = self.config
        c["hist_items"][rows] = view.items
        c["hist_actions"][rows] = view.actions
        c["hist_ts"][rows] = view.ts
        c["hist_len"][rows] = view.length
        c["hist_gap_buckets"][rows] = self.gaps(exp.ts[:, None] - view.ts, view.actions != 0)
        c["gap_bucket"][rows] = self.gaps(exp.ts - view.prev_ts, view.length > 0)
        hour, weekday, week = calendar(exp.ts)
        c["hour"][rows] = hour
        c["weekday"][rows] = weekday
        c["week"][rows] = week
        c["rank_package"][rows] = rank_package(exp.item, view.items, view.actions, view.hot, exp.eid, cfg.seed)
        c["neg_items"][rows] = self.item_pool.sample(exp.eid, exp.item, self.K, cfg.seed)
        user_prior, item_prior = self.popularity.ctr_priors(exp.user, exp.item)
        c["user_ctr_prior"][rows] = user_prior
        c["item_ctr_prior"][rows] = item_prior

    # ---------------------------------------------------------------- emit
    def _emit_closed(self, watermark: int, emitted: _Emitted) -> None:
        """First emissions due, then releases of samples closed in event time."""
        c = self.pool.cols
        live = self.pool.live
        first = np.flatnonzero(live & ~c["emitted"] & (c["emit_at"] < watermark))
        first = first[np.lexsort((c["sample_id"][first], c["ts"][first], c["emit_at"][first]))]
        emitted.add(first, c["emit_at"][first], correction=False)
        c["emitted"][first] = True
        closed = np.flatnonzero(live & (c["closes_at"] < watermark))
        if self.config.policy == "emit_then_correct":
            unconverted = (c["click"][closed] == 1) & (c["convert"][closed] == 0) & ~c["late_convert"][closed]
            self.counters["conversion_waits_expired"] += int(unconverted.sum())
        self._release(closed)

    def _enforce_pending_cap(self, emitted: _Emitted) -> None:
        excess = len(self.pool) - self.config.max_pending_samples
        if excess <= 0:
            return
        c = self.pool.cols
        live = np.flatnonzero(self.pool.live)
        oldest = live[np.lexsort((c["sample_id"][live], c["ts"][live]))[:excess]]
        fresh = oldest[~c["emitted"][oldest]]
        emitted.add(fresh, np.full(len(fresh), self.watermark, np.int64), correction=False)
        self.counters["forced_emissions"] += len(fresh)
        self._release(oldest)

    def _release(self, rows: np.ndarray) -> None:
        c = self.pool.cols
        index = self._index
        for key in c["key"][rows[c["indexed"][rows]]].tolist():
            del index[key]
        c["indexed"][rows] = False
        self.pool.release(rows)

    def _assemble(self, emitted: _Emitted) -> SampleBatch:
        if not emitted.batches:
            return empty_batch(self.L, self.K, self.S, self.D)
        if len(emitted.batches) == 1:
            batch = emitted.batches[0]  # first emissions only: gathered in order already
        else:
            batch = concat_batches(emitted.batches)
            order = np.lexsort((batch["is_correction"], batch["sample_id"], batch["ts"], np.concatenate(emitted.emit_time)))
            batch = {name: column[order] for name, column in batch.items()}
        self.counters["samples_emitted"] += len(batch["sample_id"])
        self.counters["corrections_emitted"] += int(batch["is_correction"].sum())
        return batch

    # ---------------------------------------------------------------- offsets
    def min_live_offsets(self) -> dict[int, int]:
        """Per partition, the smallest offset still held (staged event or pending
        exposure): re-reading from there rebuilds all pending work (at-least-once)."""
        out: dict[int, int] = {}
        live = np.flatnonzero(self.pool.live)
        parts = [self.pool.cols["partition"][live], *(b.partition for b in self._staged)]
        offsets = [self.pool.cols["offset"][live], *(b.offset for b in self._staged)]
        part, off = np.concatenate(parts), np.concatenate(offsets)
        for p in np.unique(part).tolist():
            out[p] = int(off[part == p].min())
        return out

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        staged = EventBatch.concat(self._staged) if self._staged else EventBatch.empty(self.S, self.D)
        # Staged events are held in arrival order, which interleaves partitions as fetches
        # happened to land; saved in (partition, offset) order, the state is a function of what
        # was consumed, not of when (order is immaterial to the join: _finalise sorts).
        staged = staged.take(np.lexsort((staged.offset, staged.partition)))
        staged_cols = {name: getattr(staged, name).copy() for name in
                       ("ts", "etype", "eid", "user", "item", "key", "partition", "offset", "sparse", "dense")}
        return {
            "format_version": FORMAT_VERSION,
            "watermark": self.watermark,
            "bucket": self._bucket,
            "partition_max": {str(p): t for p, t in sorted(self._partition_max.items())},
            "assigned": sorted(self._assigned),
            "counters": dict(self.counters),
            "staged": {**staged_cols, "raw": pack_bytes(staged.raw.tolist())},
            "pending": self.pool.state_dict(),
            "history": self.history.state_dict(),
            "item_pool": self.item_pool.state_dict(),
            "popularity": self.popularity.state_dict(),
            "dedupe": self.dedupe.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"joiner state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        self.pool.load_state_dict(state["pending"])
        self.history.load_state_dict(state["history"])
        self.item_pool.load_state_dict(state["item_pool"])
        self.popularity.load_state_dict(state["popularity"])
        self.dedupe.load_state_dict(state["dedupe"])
        self.watermark = int(state["watermark"])
        self._bucket = None if state["bucket"] is None else int(state["bucket"])
        self._partition_max = {int(p): int(t) for p, t in state["partition_max"].items()}
        self._assigned = {int(p) for p in state["assigned"]}
        self.counters = {**dict.fromkeys(COUNTERS, 0), **{k: int(v) for k, v in state["counters"].items()}}
        s = state["staged"]
        raw = np.empty(len(s["ts"]), object)
        raw[:] = unpack_bytes(s["raw"])
        staged = EventBatch(
            ts=np.asarray(s["ts"], np.int64), etype=np.asarray(s["etype"], np.int8), eid=np.asarray(s["eid"], np.int64),
            user=np.asarray(s["user"], np.int64), item=np.asarray(s["item"], np.int64), key=np.asarray(s["key"], np.int64),
            partition=np.asarray(s["partition"], np.int32), offset=np.asarray(s["offset"], np.int64),
            sparse=np.asarray(s["sparse"], np.int64).reshape(-1, self.S),
            dense=np.asarray(s["dense"], np.float32).reshape(-1, self.D), raw=raw)
        self._staged = [staged] if len(staged) else []
        self._staged_count = len(staged)
        c = self.pool.cols
        rows = np.flatnonzero(self.pool.live & c["indexed"])
        self._index = dict(zip(c["key"][rows].tolist(), rows.tolist()))
