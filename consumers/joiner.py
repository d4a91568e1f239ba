"""The event-time label joiner: events in, finished samples out. No Kafka, no clocks.

How it works
------------
1. ``ingest(events)`` hands each partition's events, in message order, to
   :class:`~consumers.admission.Admission`: it drops retries (per-partition id window),
   rejects events below the partition's watermark (``too_late``), holds events far ahead
   of the partition's event time in a quarantine until later events confirm or outvote
   them (``ts_ahead``, DESIGN §6.6), and admits the rest into a reorder buffer. A
   partition's watermark is its clock (max admitted ts) minus ``allowed_lateness_ms``:
   a function of the partition's own message order only.
2. ``advance()`` raises the joiner watermark to the minimum of the partition watermarks
   of all assigned partitions (DESIGN §6.1; it never goes down), finalises the buffered
   events below it in canonical order ``(ts, type, event-id hash, partition, offset)`` and
   emits every sample whose windows closed.
3. Finalising walks the events in segments of one ``stats_refresh_ms`` bucket each.
   Per segment: the topic-wide contract is screened first (DESIGN §6.7: an event id
   already finalised from another partition is ``duplicate_event_id``; a second exposure
   of the same request x item x user is ``duplicate_exposure``; both decided against
   bounded windows of finalised keys, in canonical order, so "first" never depends on
   arrival); exposures open pending samples, clicks/conversions attach labels to an open
   exposure *of the same user* (``label_user_mismatch`` when only another user's matches,
   ``orphan_*`` when none does); every exposure gets its history prefix, time features,
   rank package, negatives and priors, then the segment's accepted events join the user
   histories and popularity counters. When a segment starts a new bucket, popularity/
   item-pool snapshots are taken and over-capacity users/items are evicted.

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
(``max_pending_samples``, ``max_buffered_events``, ``max_quarantined``), a changing
partition assignment and a state repaired on load can break that; they are counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from consumers.admission import COUNTERS as ADMISSION_COUNTERS
from consumers.admission import Admission, Admitted
from consumers.config import JoinerConfig
from consumers.dedupe import NEW, DedupeWindow
from consumers.hashing import mix_ids
from consumers.history import HistoryView, UserHistory
from consumers.joinindex import OpenExposures
from consumers.negatives import ItemPool, rank_package
from consumers.pending import SamplePool
from consumers.popularity import PopularitySource
from consumers.reasons import Reason, Rejection
from consumers.schema import Action, EventBatch, SampleBatch, concat_batches, empty_batch
from consumers.timefeatures import GapBuckets, calendar
from consumers.topic import SoleJoiner, TopicExchange

log = logging.getLogger(__name__)

# 2: admission state (quarantine, anchors), topic-wide id windows, last finalised ts, raw
# bytes kept for staged exposures. A format-1 state is upgraded on load (see load_state_dict).
FORMAT_VERSION = 2
NO_WATERMARK = -(2**63)
END_OF_TIME = 2**63 - 1

_EXPOSURE, _CLICK, _CONVERT = int(Action.EXPOSURE), int(Action.CLICK), int(Action.CONVERT)

COUNTERS = (
    "events_accepted",  # admitted into the reorder buffer
    *ADMISSION_COUNTERS,  # duplicates, events_quarantined, partition_anchors, forced_anchors
    "samples_emitted",  # rows emitted, corrections included
    "corrections_emitted",  # emit_then_correct re-emissions
    "forced_emissions",  # samples emitted early because max_pending_samples was hit
    "forced_watermark_advances",  # times max_buffered_events pushed the watermark
    "conversion_waits_expired",  # emit_then_correct samples whose conversion never came
    "state_repairs",  # partition clocks (or the watermark) a restored state could not support
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
        batch["emit_ms"] = emit_time.astype(np.int64)
        batch["is_correction"] = np.full(len(rows), correction)
        if correction:
            batch["convert"][:] = 1
        self.batches.append(batch)
        self.emit_time.append(emit_time)


class LabelJoiner:
    def __init__(self, config: JoinerConfig, popularity: PopularitySource, exchange: TopicExchange = SoleJoiner()) -> None:
        self.config = config
        self.popularity = popularity
        self.exchange = exchange  # other joiners of the topic (consumers/topic.py); alone by default
        self.L = config.history_len
        self.S = len(config.sparse_features)
        self.D = len(config.dense_features)
        self.K = config.num_random_negatives
        self.history = UserHistory(self.L, config.max_history_users)
        self.pool = SamplePool(self.L, self.K, self.S, self.D)
        self.item_pool = ItemPool(config.item_pool_size)
        self.admission = Admission(config, self.S, self.D)
        self.event_ids = DedupeWindow(config.topic_id_window)  # finalised event ids, tagged with their partition
        self.exposure_keys = DedupeWindow(config.topic_id_window)  # finalised exposures' request x item x user
        self.open = OpenExposures()
        self.gaps = GapBuckets(config.gap_bucket_edges_ms)
        self.watermark = NO_WATERMARK
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._staged: list[EventBatch] = []
        self._staged_count = 0
        self._assigned: set[int] = set()
        self._bucket: int | None = None  # stats_refresh_ms bucket of the last finalised segment
        self._finalised_ts: int | None = None  # ts of the last finalised event (canonical order)

    # ---------------------------------------------------------------- partitions
    def assign(self, partitions: list[int]) -> None:
        """Partitions now consumed: their watermarks hold the joiner's back until they
        are anchored (have a confirmed event time)."""
        self._assigned.update(partitions)

    def revoke(self, partitions: list[int]) -> None:
        """Partitions no longer consumed: they stop holding the watermark back. Their
        pending samples stay and are emitted as the watermark moves."""
        self._assigned.difference_update(partitions)

    @property
    def partition_watermarks(self) -> dict[int, int | None]:
        """Per assigned partition: its clock minus lateness (None until anchored). The
        joiner's ``watermark`` follows their minimum; export both as metrics."""
        lateness = self.config.allowed_lateness_ms
        clocks = {p: self.admission.clock(p) for p in sorted(self._assigned)}
        return {p: None if c is None else c - lateness for p, c in clocks.items()}

    @property
    def pending(self) -> int:
        """Samples opened and not yet released (bounded by ``max_pending_samples``)."""
        return len(self.pool)

    @property
    def buffered(self) -> int:
        """Events in the reorder buffer (bounded by ``max_buffered_events``)."""
        return self._staged_count

    @property
    def quarantined(self) -> int:
        """Events held as far ahead of their partition's time (``max_quarantined`` per partition)."""
        return self.admission.quarantined

    # ---------------------------------------------------------------- ingest
    def ingest(self, events: EventBatch) -> list[Rejection]:
        """Admit decoded events (message order per partition). Returns the rejections
        decided now (``too_late``, ``ts_ahead``)."""
        if not len(events):
            return []
        self._assigned.update(np.unique(events.partition).tolist())
        admitted = self.admission.admit(events, self.watermark)
        self._stage(admitted)
        return admitted.rejections

    def _stage(self, admitted: Admitted) -> None:
        if len(admitted.events):
            self._staged.append(admitted.events)
            self._staged_count += len(admitted.events)
        self.counters["events_accepted"] += len(admitted.events)
        for name, n in admitted.counts.items():
            self.counters[name] += n

    # ---------------------------------------------------------------- advance
    def advance(self) -> Emission:
        """Move the watermark as far as the assigned partitions allow; finalise and emit."""
        return self.advance_to(self.partition_floor(), self.forced_floor())

    def partition_floor(self) -> int | None:
        """Where the assigned partitions let the watermark go: the minimum of their
        watermarks (:data:`NO_WATERMARK` while one is not anchored); None with no
        partition assigned. Joiners sharing a topic advance to the minimum of theirs."""
        if not self._assigned:
            return None
        clocks = [self.admission.clock(p) for p in self._assigned]
        if any(c is None for c in clocks):
            return NO_WATERMARK
        return min(c for c in clocks if c is not None) - self.config.allowed_lateness_ms

    def forced_floor(self) -> int | None:
        """Where ``max_buffered_events`` forces the watermark (None while under the cap)."""
        if self._staged_count <= self.config.max_buffered_events:
            return None
        all_ts = np.concatenate([b.ts for b in self._staged])
        excess = self._staged_count - self.config.max_buffered_events
        return int(np.partition(all_ts, excess - 1)[excess - 1]) + 1

    def advance_to(self, floor: int | None, forced: int | None = None) -> Emission:
        """Raise the watermark to ``floor`` (never down; None: stay) or, beyond it, to
        ``forced`` (the buffer valve, counted); finalise and emit. Joiners sharing a
        topic call this together with the same arguments."""
        target = self.watermark if floor is None else max(self.watermark, floor)
        if forced is not None and forced > target:
            target = forced
            self.counters["forced_watermark_advances"] += 1
        return self._advance_to(target)

    def flush(self) -> Emission:
        """End of input (bounded replays, tests): decide the quarantine, finalise everything
        and emit every pending sample with the labels it has. Later events will all be too late."""
        admitted = self.admission.flush(self.watermark)
        self._stage(admitted)
        emission = self._advance_to(END_OF_TIME)
        emission.rejections[:0] = admitted.rejections
        return emission

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
        events = self._take_ready(watermark)
        if len(events):
            self._finalised_ts = int(events.ts[-1])
        bucket = events.ts // self.config.stats_refresh_ms  # ascending: events are in canonical order
        rejections: list[Rejection] = []
        # One segment per bucket any joiner of the topic finalises now (this one's alone by
        # default): popularity and item-pool refreshes happen at the same boundaries everywhere.
        for b in self.exchange.buckets(np.unique(bucket)).tolist():
            start, stop = np.searchsorted(bucket, [b, b + 1])
            if self._bucket is not None and b > self._bucket:
                self._refresh()
            self._bucket = b
            rejections += self._segment(events.take(slice(int(start), int(stop))), emitted)
        return rejections

    def _take_ready(self, watermark: int) -> EventBatch:
        """Remove the staged events below ``watermark`` and return them in canonical order."""
        if not self._staged:
            return EventBatch.empty(self.S, self.D)
        staged = EventBatch.concat(self._staged) if len(self._staged) > 1 else self._staged[0]
        ready = staged.ts < watermark
        rest = staged.take(~ready)
        self._staged = [rest] if len(rest) else []
        self._staged_count = len(rest)
        events = staged.take(ready)
        return events.take(np.lexsort((events.offset, events.partition, events.eid, events.etype, events.ts)))

    def _refresh(self) -> None:
        """An event-time boundary: everything before it has been finalised."""
        self.history.evict_over_capacity()
        self.popularity.refresh()
        self.item_pool.refresh()

    def _segment(self, ev: EventBatch, emitted: _Emitted) -> list[Rejection]:
        """One bucket of finalised events, canonical order: screen, open, join, featurise, observe."""
        ev, rejections = self._screen(ev)
        is_exposure = ev.etype == _EXPOSURE
        exp_idx = np.flatnonzero(is_exposure)
        exp = ev.take(exp_idx)
        rows = self.pool.alloc(len(exp_idx))
        self._open(rows, exp)
        row_of = np.full(len(ev), -1, np.int64)
        row_of[exp_idx] = rows
        push = np.ones(len(ev), np.bool_)
        rejections += self._join_labels(ev, row_of, push, emitted)
        hot = self.popularity.item_popularity(ev.item) > self.popularity.hot_threshold()
        view = self.history.query_then_append(ev.user, ev.ts, ev.item, ev.etype, hot, is_exposure, push)
        self._features(rows, exp, view)
        topic, topic_push = self.exchange.share(ev, push)  # every joiner's, when several share the topic
        self.popularity.observe(topic.user[topic_push], topic.item[topic_push], topic.etype[topic_push],
                                topic.ts[topic_push])
        self.item_pool.observe(topic.item[topic.etype == _EXPOSURE])
        return rejections

    def _screen(self, ev: EventBatch) -> tuple[EventBatch, list[Rejection]]:
        """The topic-wide contract (DESIGN §6.7), in canonical order: an event id is unique
        across partitions (the first copy wins; a copy from the *same* partition is a retry
        its dedupe window forgot: counted, not DLQ'd), and a request shows an item to a user
        once (a later exposure of the same request x item x user is a re-send)."""
        owner = self.event_ids.claim_all(ev.eid, ev.partition.astype(np.int64))
        retry = owner == ev.partition
        taken = (owner != NEW) & ~retry
        self.counters["duplicates"] += int(retry.sum())
        keep = owner == NEW
        exposures = np.flatnonzero(keep & (ev.etype == _EXPOSURE))
        resent = exposures[self.exposure_keys.claim_all(mix_ids(ev.key[exposures], ev.user[exposures])) != NEW]
        keep[resent] = False
        why = {i: (Reason.DUPLICATE_EVENT_ID, f"event_id already taken by an earlier event of partition {p}")
               for i, p in zip(np.flatnonzero(taken).tolist(), owner[taken].tolist())}
        why.update(dict.fromkeys(resent.tolist(), (Reason.DUPLICATE_EXPOSURE,
                                                   "an earlier exposure has the same request_id, item_id and user_id")))
        rejections = [Rejection(reason, detail, ev.raw[i], int(ev.partition[i]), int(ev.offset[i]))
                      for i, (reason, detail) in sorted(why.items())]
        return (ev if keep.all() else ev.take(keep)), rejections

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

    def _join_labels(self, ev: EventBatch, row_of: np.ndarray, push: np.ndarray, emitted: _Emitted) -> list[Rejection]:
        """Clicks and conversions in canonical order, each attached to its user's open
        exposure with the same (request_id, item_id). Rejected events are cleared in
        ``push`` (they enter neither history nor popularity)."""
        exposures = row_of >= 0
        self.open.add(ev.key[exposures], row_of[exposures])  # findable only by labels at or after their ts
        rejections: list[Rejection] = []
        corrections: list[tuple[int, int]] = []  # (row, conversion ts)
        labels = np.flatnonzero(~exposures)
        for i, etype, pair, user, ts in zip(labels.tolist(), ev.etype[labels].tolist(), ev.key[labels].tolist(),
                                            ev.user[labels].tolist(), ev.ts[labels].tolist()):
            row, problem = self._find_exposure(pair, user, ts, etype)
            if problem is None:
                problem = self._attach_click(row, ts) if etype == _CLICK else self._attach_convert(row, ts, corrections)
            if problem is not None:
                push[i] = False
                rejections.append(Rejection(problem[0], problem[1], ev.raw[i], int(ev.partition[i]), int(ev.offset[i])))
        if corrections:
            rows, at = np.array(corrections, np.int64).T
            emitted.add(rows, at, correction=True)
        return rejections

    def _find_exposure(self, pair: int, user: int, ts: int, etype: int) -> tuple[int, tuple[Reason, str] | None]:
        """The latest exposure of ``user`` with ``pair`` open at ``ts``: at or before it (so
        before it in canonical order) and its windows not closed in event time — the
        answer never depends on when a sample was physically released. Or why there is none."""
        c = self.pool.cols
        users, exposed_at, closes_at = c["user"], c["ts"], c["closes_at"]
        other = False
        for row in reversed(self.open.rows(pair)):
            if not exposed_at[row] <= ts <= closes_at[row]:
                continue
            if users[row] == user:
                return row, None
            other = True
        if other:
            return -1, (Reason.LABEL_USER_MISMATCH, "the open exposure of this (request_id, item_id) is another user's")
        orphan = Reason.ORPHAN_CLICK if etype == _CLICK else Reason.ORPHAN_CONVERT
        return -1, (orphan, "no open exposure for (request_id, item_id)")

    def _attach_click(self, row: int, ts: int) -> tuple[Reason, str] | None:
        """The first click in the window labels the sample; ``wait`` then waits for a conversion."""
        cfg = self.config
        c = self.pool.cols
        start = int(c["ts"][row])
        if not start <= ts <= start + cfg.click_window_ms:
            return Reason.CLICK_OUTSIDE_WINDOW, f"click {ts - start} ms after its exposure, window {cfg.click_window_ms}"
        if c["click_ts"][row] < 0:
            c["click_ts"][row] = ts
            c["click"][row] = 1
            wait_until = ts + cfg.convert_window_ms
            if cfg.policy == "wait":
                c["emit_at"][row] = c["closes_at"][row] = wait_until
            else:
                c["closes_at"][row] = max(int(c["closes_at"][row]), wait_until)
        return None

    def _attach_convert(self, row: int, ts: int, corrections: list[tuple[int, int]]) -> tuple[Reason, str] | None:
        """A conversion counts after the click, within the convert window; under
        ``emit_then_correct`` one after the first emission (in event time) is a correction."""
        cfg = self.config
        c = self.pool.cols
        clicked_at = int(c["click_ts"][row])
        if clicked_at < 0 or ts < clicked_at:
            return Reason.CONVERT_WITHOUT_CLICK, "no click at or before the conversion"
        if ts > clicked_at + cfg.convert_window_ms:
            return Reason.CONVERT_OUTSIDE_WINDOW, f"conversion {ts - clicked_at} ms after its click, window {cfg.convert_window_ms}"
        if c["convert"][row] or c["late_convert"][row]:
            return None  # a second conversion changes nothing
        if cfg.policy == "wait" or ts <= c["emit_at"][row]:
            c["convert"][row] = 1  # before the (first) emission, in event time
            if cfg.policy != "wait":
                c["closes_at"][row] = c["emit_at"][row]  # nothing left to wait for
        else:
            # emit_then_correct, after the first emission in event time (whether or not
            # that emission physically happened yet): a correction, now
            c["late_convert"][row] = True
            c["closes_at"][row] = ts
            corrections.append((row, ts))
        return None

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
        self.open.remove(self.pool.cols["key"][rows], rows)
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
        """Per partition, the smallest offset still held (buffered, quarantined or pending
        exposure): re-reading from there rebuilds all pending work (at-least-once)."""
        out: dict[int, int] = {}
        live = np.flatnonzero(self.pool.live)
        held = self.admission.held
        parts = [self.pool.cols["partition"][live], held.partition, *(b.partition for b in self._staged)]
        offsets = [self.pool.cols["offset"][live], held.offset, *(b.offset for b in self._staged)]
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
        return {
            "format_version": FORMAT_VERSION,
            "watermark": self.watermark,
            "bucket": self._bucket,
            "finalised_ts": self._finalised_ts,
            "assigned": sorted(self._assigned),
            "counters": dict(self.counters),
            "staged": staged.state_dict(),
            "admission": self.admission.state_dict(),
            "event_ids": self.event_ids.state_dict(),
            "exposure_keys": self.exposure_keys.state_dict(),
            "pending": self.pool.state_dict(),
            "history": self.history.state_dict(),
            "item_pool": self.item_pool.state_dict(),
            "popularity": self.popularity.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a format-1 state (written before the clock guard and the topic-wide
        checks) is upgraded: its partition max ts become anchored clocks, the topic-wide
        id windows start empty, and the last finalised time is read off the histories and
        pending samples. Either way the clocks are then checked against the events the
        state holds (:meth:`_repair`), so a poisoned clock does not survive the restart."""
        version = state.get("format_version")
        if version not in (1, FORMAT_VERSION):
            raise ValueError(f"joiner state format {version!r}, expected {FORMAT_VERSION} (or 1, upgraded)")
        self.pool.load_state_dict(state["pending"])
        self.history.load_state_dict(state["history"])
        self.item_pool.load_state_dict(state["item_pool"])
        self.popularity.load_state_dict(state["popularity"])
        self.watermark = int(state["watermark"])
        self._bucket = None if state["bucket"] is None else int(state["bucket"])
        self._assigned = {int(p) for p in state["assigned"]}
        self.counters = {**dict.fromkeys(COUNTERS, 0), **{k: int(v) for k, v in state["counters"].items()}}
        if version == 1:
            self.admission.load_clocks({int(p): int(t) for p, t in state["partition_max"].items()})
            self.admission.dedupe.load_state_dict(state["dedupe"])
            self.event_ids = DedupeWindow(self.config.topic_id_window)
            self.exposure_keys = DedupeWindow(self.config.topic_id_window)
            self._finalised_ts = self._latest_finalised_evidence()
        else:
            self.admission.load_state_dict(state["admission"])
            self.event_ids.load_state_dict(state["event_ids"])
            self.exposure_keys.load_state_dict(state["exposure_keys"])
            self._finalised_ts = None if state["finalised_ts"] is None else int(state["finalised_ts"])
        c = self.pool.cols
        live = np.flatnonzero(self.pool.live)
        live = live[np.lexsort((c["offset"][live], c["partition"][live], c["sample_id"][live], c["ts"][live]))]
        self.open.rebuild(c["key"][live], live)  # canonical order, as they were finalised
        self._repair(EventBatch.from_state(state["staged"], self.S, self.D))

    def _latest_finalised_evidence(self) -> int | None:
        """The latest event time a format-1 state shows as finalised: user histories and
        pending samples (a lower bound: rejected and evicted events left no trace)."""
        live = self.pool.cols["ts"][self.pool.live]
        latest = max(int(self.history.ts.max(initial=0)), int(live.max(initial=0)))
        return latest or None

    def _repair(self, staged: EventBatch) -> None:
        """Clocks and watermark a restored state cannot support go back to what it can
        (counted in ``state_repairs``, logged): staged events far ahead of their partition
        return to its quarantine, and a watermark beyond every partition's clock falls
        back to just after the last finalised event (finalisation stays in canonical
        order; samples the poisoned watermark already emitted cannot be taken back)."""
        kept, repaired = self.admission.repair(staged, self._finalised_ts)
        self._staged = [kept] if len(kept) else []
        self._staged_count = len(kept)
        self.counters["state_repairs"] += len(repaired)
        if self.watermark in (NO_WATERMARK, END_OF_TIME):
            return
        clocks = [c for c in self.admission.clocks.values() if c is not None]
        if clocks and self.watermark <= max(clocks) + self.config.max_future_ms:
            return
        floor = NO_WATERMARK if self._finalised_ts is None else self._finalised_ts + 1
        if floor < self.watermark:
            log.warning("joiner watermark %d is ahead of every partition's clock; back to %d", self.watermark, floor)
            self.watermark = floor
            self.counters["state_repairs"] += 1
