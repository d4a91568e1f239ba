"""Which arriving events enter the join: per partition, in its own message order. No Kafka, no clocks.

Every decision here is a function of one partition's message sequence (and the joiner's
watermark as a floor), so it never depends on how partitions interleave or how input
was batched.

Per partition
-------------
* **clock**: the partition's event time, the max ts of the events admitted so far (None
  before the partition is *anchored*). Its watermark is ``clock - allowed_lateness_ms``;
  an arriving event below that (or below the joiner's watermark) is ``too_late``.
* **dedupe**: a window of recent event ids; a repeat is a producer retry, dropped and
  counted (never DLQ'd, never evidence).
* **quarantine** (DESIGN §6.6, one bad clock must not discard other events): an event more
  than ``max_future_ms`` ahead of the clock is *held*, and a held event does not move the
  clock while it is held. A partition without a clock holds every event, so its very
  first event cannot anchor it alone.

The evidence rule
-----------------
What tells a bad clock from a partition whose time moved on (after a traffic gap, in a
sparse stream, on a new partition) is what arrives *after* the held event. With ``N`` =
``confirm_events`` and ``L`` = ``allowed_lateness_ms``, each later arrival (retries aside)

- **opposes** it when it is more than ``L`` before it: the partition's time is still
  behind it;
- **continues its run** when it is at or after the latest event of the run minus ``L``:
  the held event and the arrivals after it are in event-time order, the way a
  partition's time moves on, whatever the gaps;
- otherwise (after it, but out of order within the run) starts its run again.

A held event leaves the quarantine by

- **confirmation**: its run reaches ``N - 1`` (``N`` consecutive events in event-time
  order, the first of them itself). It becomes the partition's time. An increasing
  stream, whatever its gaps, confirms every event ``N - 1`` arrivals after it at most;
  random or conflicting timestamps never form such a run; a burst of fewer than ``N``
  events is broken by the next event at the partition's real time.
- **release with the clock**: whenever the clock moves (an in-time arrival or a
  confirmation), held events within ``L`` of it are admitted (caught up), and so are
  those within ``max_future_ms`` of it that nothing ever opposed (in time, had they
  arrived now, and every later arrival agrees with them). What they admit can bring
  more. Released events are replayed in arrival order under the lateness rule among
  themselves: the clock cannot make one late (it was ahead of the clock when it
  arrived), only an earlier-arriving one of them or the joiner's watermark can.
- **rejection**: ``N`` later arrivals opposed it: DLQ ``ts_ahead``. So a lone far-future
  event, or a burst of fewer than ``N``, costs exactly its own DLQ records and never
  moves the clock.
- **end of input** (``flush``): what nothing ever opposed is released — nothing came
  after it that it could make late, and flush finalises everything anyway — so a sparse
  log keeps its last events; what is still held is ``ts_ahead``.
- **overflow**: more than ``max_quarantined`` held (arrivals that neither confirm, oppose
  nor stay in order, e.g. two interleaved clocks far apart): the oldest held event is
  decided as at end of input. Counted.

Limits: ``N`` or more events in event-time order far ahead (one bad producer alone in a
partition for that long) are a jump and are trusted; a partition whose events are
further apart than ``max_future_ms`` runs ``N - 1`` of its events behind (and holds the
joiner's watermark back that long); an event with nothing after it is admitted at end
of input whatever its time.

The fast path (an anchored partition, an empty quarantine, nothing ahead) is vectorised;
the walk in :class:`_Walk` runs event by event only while something is held.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from consumers.config import JoinerConfig
from consumers.dedupe import DedupeWindow, PartitionedDedupe
from consumers.reasons import Reason, Rejection
from consumers.schema import EventBatch

log = logging.getLogger(__name__)

# 2: per held event the evidence of later arrivals (run, run top, oppositions) instead of
# one vote count and a per-partition streak. Format 1 is upgraded on load (load_state_dict).
FORMAT_VERSION = 2
_NO_TIME = int(np.iinfo(np.int64).min)


@dataclass(slots=True)
class Admitted:
    """The outcome of one :meth:`Admission.admit` (or ``flush``) call."""

    events: EventBatch  # admitted, in admission order within each partition
    rejections: list[Rejection] = field(default_factory=list)  # too_late, ts_ahead
    counts: dict[str, int] = field(default_factory=dict)  # increments of COUNTERS


COUNTERS = (
    "duplicates",  # dropped by a partition's dedupe window (idempotence, not DLQ'd)
    "events_quarantined",  # held on arrival: ahead of their partition's clock, or before it was anchored
    "partition_anchors",  # clocks set or moved by a confirmed held event
    "forced_anchors",  # clocks set or moved by held events admitted unconfirmed: quarantine overflow, end of input
)


class _Evidence:
    """What the arrivals after each held event said about it: one column per held event,
    in arrival order, of one (4, H) int64 array (one array: the walk appends and drops
    columns on every arrival)."""

    __slots__ = ("a",)
    # Rows: the held event's own ts; later arrivals in its current in-order run; the latest
    # ts of that run (its own ts while the run is empty); later arrivals more than the
    # lateness before it.
    TS, RUN, TOP, OPPOSED = range(4)

    def __init__(self, a: np.ndarray) -> None:
        self.a = a

    @staticmethod
    def fresh(ts: np.ndarray) -> "_Evidence":
        """No arrivals after them yet."""
        a = np.zeros((4, len(ts)), np.int64)
        a[_Evidence.TS] = a[_Evidence.TOP] = ts
        return _Evidence(a)

    @staticmethod
    def concat(parts: Sequence["_Evidence"]) -> "_Evidence":
        return _Evidence(np.concatenate([p.a for p in parts], axis=1))

    def take(self, index: np.ndarray) -> "_Evidence":
        """Columns ``index`` (int index or bool mask), copied."""
        return _Evidence(self.a.compress(index, axis=1) if index.dtype == np.bool_ else self.a[:, index])

    def copy(self) -> "_Evidence":
        return _Evidence(self.a.copy())

    def append(self, ts: int) -> None:
        """A newly held event."""
        self.a = np.concatenate((self.a, np.array([[ts], [0], [ts], [0]], np.int64)), axis=1)

    @property
    def ts(self) -> np.ndarray:
        return self.a[self.TS]

    @property
    def run(self) -> np.ndarray:
        return self.a[self.RUN]

    @property
    def opposed(self) -> np.ndarray:
        return self.a[self.OPPOSED]

    def observe(self, ts: int, lateness: int) -> None:
        """One later arrival at ``ts``, in place."""
        own, run, top, opposed = self.a
        before = own > ts + lateness  # the partition's time is still behind the held event
        in_order = top <= ts + lateness  # never true where ``before`` is (top >= own)
        opposed += before
        # Out of order but not before the held event: a new run, of the held event and this arrival.
        run[:] = np.where(in_order, run + 1, ~before)
        np.maximum(np.where(in_order, top, own), ts, out=top)


@dataclass(slots=True)
class _Lane:
    """One partition's admission state."""

    held: EventBatch  # quarantined events, arrival order
    evidence: _Evidence  # aligned with ``held``
    clock: int | None = None  # max admitted ts; None = not anchored
    anchor: int | None = None  # latest ts admitted from the quarantine (kept for repairs on load)


class Admission:
    """The per-partition gate in front of the join; its state is the clocks, quarantines and dedupe windows."""

    def __init__(self, config: JoinerConfig, num_sparse: int, num_dense: int) -> None:
        self.config = config
        self.S, self.D = num_sparse, num_dense
        self.dedupe = PartitionedDedupe(config.dedupe_window)
        self._lanes: dict[int, _Lane] = {}

    def _lane(self, partition: int) -> _Lane:
        lane = self._lanes.get(partition)
        if lane is None:
            lane = self._lanes[partition] = _Lane(EventBatch.empty(self.S, self.D), _Evidence.fresh(np.zeros(0, np.int64)))
        return lane

    # ---------------------------------------------------------------- queries
    def clock(self, partition: int) -> int | None:
        """The partition's event time; None until it is anchored."""
        lane = self._lanes.get(partition)
        return None if lane is None else lane.clock

    @property
    def clocks(self) -> dict[int, int | None]:
        return {p: lane.clock for p, lane in sorted(self._lanes.items())}

    @property
    def quarantined(self) -> int:
        return sum(len(lane.held) for lane in self._lanes.values())

    @property
    def held(self) -> EventBatch:
        """Every quarantined event (partition by partition, arrival order)."""
        lanes = [lane.held for _, lane in sorted(self._lanes.items()) if len(lane.held)]
        return EventBatch.concat(lanes) if lanes else EventBatch.empty(self.S, self.D)

    # ---------------------------------------------------------------- admit
    def admit(self, events: EventBatch, floor: int) -> Admitted:
        """Decide every event of ``events`` (message order per partition); ``floor`` is the
        joiner's watermark: nothing below it may enter."""
        out = _Collector(self.S, self.D)
        for p in np.unique(events.partition).tolist():
            chunk = events.take(np.flatnonzero(events.partition == p))
            lane = self._lane(p)
            while len(chunk):
                chunk = chunk.take(slice(self._fast(lane, chunk, floor, out), None))
                if not len(chunk):
                    break
                walk = _Walk(self.config, lane, chunk, floor, self.dedupe.window(p))
                walked = walk.run()  # stops once nothing is held: the rest may take the fast path
                walk.finish(out)
                chunk = chunk.take(slice(walked, None))
        return out.result()

    def _fast(self, lane: _Lane, chunk: EventBatch, floor: int, out: "_Collector") -> int:
        """The common case in bulk: the leading events of ``chunk`` that need no walk.
        Returns how many it decided (0 while the partition has no clock or holds events)."""
        if lane.clock is None or len(lane.held):
            return 0
        cfg = self.config
        # The clock before each event. Too-late events never exceed it and nothing in the
        # prefix taken is ahead, so a plain running max over all events is the walk's clock.
        running = np.maximum.accumulate(chunk.ts)
        before = np.empty_like(running)
        before[0] = lane.clock
        np.maximum(running[:-1], lane.clock, out=before[1:])
        limit = np.maximum(before - cfg.allowed_lateness_ms, floor)
        late = chunk.ts < limit
        # The walk's cases: an event ahead, or (only under a forced watermark) a too-late
        # event above the clock, which must not move it.
        stop = np.flatnonzero((chunk.ts > before + cfg.max_future_ms) | (late & (chunk.ts > before)))
        n = int(stop[0]) if len(stop) else len(chunk)
        if n == 0:
            return 0
        ts, late = chunk.ts[:n], late[:n]
        for i in np.flatnonzero(late).tolist():
            out.reject(chunk, i, Reason.TOO_LATE, f"ts {int(ts[i])} < watermark {int(limit[i])}")
        on_time = np.flatnonzero(~late)
        fresh = self.dedupe.window(int(chunk.partition[0])).admit(chunk.eid[on_time])
        out.admit(chunk.take(on_time[fresh]))
        out.count("duplicates", int(len(fresh) - fresh.sum()))
        lane.clock = max(lane.clock, int(running[n - 1]))
        return n

    def flush(self, floor: int) -> Admitted:
        """End of input: per partition, held events nothing opposed are admitted, then what
        the clock caught up; whatever is still held is ``ts_ahead``."""
        out = _Collector(self.S, self.D)
        for p, lane in sorted(self._lanes.items()):
            if not len(lane.held):
                continue
            walk = _Walk(self.config, lane, EventBatch.empty(self.S, self.D), floor, self.dedupe.window(p))
            walk.end_of_input()
            walk.finish(out)
        return out.result()

    # ---------------------------------------------------------------- repair
    def repair(self, staged: EventBatch, known_time: int | None) -> tuple[EventBatch, list[int]]:
        """Re-check restored clocks against the events the state holds (DESIGN §6.6: a bad
        clock must not survive a restart as poison, e.g. from a state written before this
        guard existed).

        Per partition, its staged events (admission order) are walked from a trusted start —
        the partition's anchor and ``known_time`` (the latest finalised event time), else
        the lower median of all staged ts — with the arrival rule: an event more than
        ``max_future_ms`` ahead of the running clock is moved back into the quarantine
        (with no evidence yet). A partition that lost an event that way gets the clock its
        remaining evidence supports (None: it anchors again like a new one). Returns the
        staged events kept and the repaired partitions. For a state this code wrote,
        nothing changes: every staged event was either within ``max_future_ms`` of the
        clock when admitted or admitted by a decision on held events, and the anchor is
        at least the latest of those.
        """
        fallback = _lower_median(staged.ts) if len(staged) else None
        keep = np.ones(len(staged), np.bool_)
        repaired: list[int] = []
        for p, lane in sorted(self._lanes.items()):
            if lane.clock is None:
                continue
            rows = np.flatnonzero(staged.partition == p)
            trusted = [t for t in (known_time, lane.anchor) if t is not None]
            start = max(trusted) if trusted else fallback
            if start is None:
                continue
            running = start
            moved = []
            for i, t in zip(rows.tolist(), staged.ts[rows].tolist()):
                if t > running + self.config.max_future_ms:
                    moved.append(i)
                else:
                    running = max(running, t)
            if not moved:
                continue
            keep[moved] = False
            kept_ts = staged.ts[rows[keep[rows]]].tolist()
            evidence = kept_ts + ([lane.anchor] if lane.anchor is not None else [])
            log.warning("partition %d: clock %d is not supported by the restored state; %d event(s) up to ts %d "
                        "go back to the quarantine", p, lane.clock, len(moved), int(staged.ts[moved].max()))
            lane.clock = max(evidence) if evidence else None
            back = staged.take(np.array(moved, np.int64))
            lane.held = EventBatch.concat([back, lane.held])
            lane.evidence = _Evidence.concat([_Evidence.fresh(back.ts), lane.evidence])
            repaired.append(p)
        return staged.take(keep), repaired

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        lanes = sorted(self._lanes.items())
        evidence = _Evidence.concat([_Evidence.fresh(np.zeros(0, np.int64)), *(lane.evidence for _, lane in lanes)])
        return {
            "format_version": FORMAT_VERSION,
            "partitions": {str(p): {"clock": lane.clock, "anchor": lane.anchor} for p, lane in lanes},
            "held": self.held.state_dict(),
            "run": evidence.a[_Evidence.RUN].copy(),
            "top": evidence.a[_Evidence.TOP].copy(),
            "opposed": evidence.a[_Evidence.OPPOSED].copy(),
            "dedupe": self.dedupe.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a format-1 state (one vote count per held event: in-time arrivals since
        it) is upgraded: its votes become oppositions and every run starts empty, so its
        held events need ``confirm_events`` fresh in-order arrivals to be confirmed."""
        version = state.get("format_version")
        if version not in (1, FORMAT_VERSION):
            raise ValueError(f"admission state format {version!r}, expected {FORMAT_VERSION} (or 1, upgraded)")
        self.dedupe.load_state_dict(state["dedupe"])
        held = EventBatch.from_state(state["held"], self.S, self.D)
        evidence = _Evidence.fresh(held.ts)
        if version == 1:
            evidence.a[_Evidence.OPPOSED] = state["votes"]
        else:
            for row, name in ((_Evidence.RUN, "run"), (_Evidence.TOP, "top"), (_Evidence.OPPOSED, "opposed")):
                evidence.a[row] = state[name]
        self._lanes = {}
        for p, lane in state["partitions"].items():
            mine = np.flatnonzero(held.partition == int(p))
            self._lanes[int(p)] = _Lane(held.take(mine), evidence.take(mine),
                                        None if lane["clock"] is None else int(lane["clock"]),
                                        None if lane["anchor"] is None else int(lane["anchor"]))

    def load_clocks(self, clocks: dict[int, int]) -> None:
        """Anchored clocks without quarantine or anchors: the upgrade of a joiner state
        written before this module existed (it kept only a max ts per partition)."""
        self._lanes = {}
        for p, clock in clocks.items():
            self._lane(p).clock = clock


class _Collector:
    """Admitted events, rejections and counts gathered over partitions."""

    def __init__(self, num_sparse: int, num_dense: int) -> None:
        self._empty = EventBatch.empty(num_sparse, num_dense)
        self._events: list[EventBatch] = []
        self.rejections: list[Rejection] = []
        self.counts = dict.fromkeys(COUNTERS, 0)

    def admit(self, events: EventBatch) -> None:
        if len(events):
            self._events.append(events)

    def reject(self, events: EventBatch, i: int, reason: Reason, detail: str) -> None:
        self.rejections.append(Rejection(reason, detail, events.raw[i], int(events.partition[i]), int(events.offset[i])))

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def result(self) -> Admitted:
        events = EventBatch.concat(self._events) if self._events else self._empty
        return Admitted(events, self.rejections, self.counts)


class _Walk:
    """One partition's events walked one by one in arrival order, after its held events
    (they arrived earlier). Works on row numbers of ``pool``; ``finish`` writes the lane back."""

    def __init__(self, config: JoinerConfig, lane: _Lane, new: EventBatch, floor: int, window: DedupeWindow) -> None:
        self.cfg = config
        self.lane = lane
        self.pool = EventBatch.concat([lane.held, new])
        self.first_new = len(lane.held)
        self.floor = floor
        self.window = window
        self.clock, self.anchor = lane.clock, lane.anchor
        self.rows = np.arange(self.first_new, dtype=np.int64)  # pool rows of the held events, arrival order
        self.evidence = lane.evidence.copy()  # the lane changes only in finish
        self.admitted: list[int] = []
        self.rejected: list[tuple[int, Reason, str]] = []
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._reach = max(config.allowed_lateness_ms, config.max_future_ms)  # nothing beyond clock + this is released

    # ------------------------------------------------------------ arrivals
    def run(self) -> int:
        """Walk the new events until the partition is anchored with nothing held; returns
        how many new events were walked (at least one)."""
        cfg = self.cfg
        ts, eids = self.pool.ts.tolist(), self.pool.eid.tolist()
        for i in range(self.first_new, len(ts)):
            t = ts[i]
            ahead = self.clock is None or t > self.clock + cfg.max_future_ms
            if ahead:
                if not self.window.add(eids[i]):
                    self.counts["duplicates"] += 1
                    continue
            else:
                limit = max(self.clock - cfg.allowed_lateness_ms, self.floor)
                if t < limit:  # its id is not claimed: a too-late event never was in
                    self.rejected.append((i, Reason.TOO_LATE, f"ts {t} < watermark {limit}"))
                elif self.window.add(eids[i]):
                    self.admitted.append(i)
                    self.clock = max(self.clock, t)
                else:
                    self.counts["duplicates"] += 1
                    continue
            if len(self.rows):
                self.evidence.observe(t, cfg.allowed_lateness_ms)
            if ahead:
                self.rows = np.concatenate((self.rows, np.array([i], np.int64)))
                self.evidence.append(t)
                self.counts["events_quarantined"] += 1
            self._settle()
            if self.clock is not None and not len(self.rows):
                return i + 1 - self.first_new
        return len(ts) - self.first_new

    def end_of_input(self) -> None:
        """No evidence will come: admit what nothing opposed and what the clock it brings
        reaches; the rest is ``ts_ahead``."""
        self._release(self.evidence.opposed == 0, "forced_anchors")
        if len(self.rows):
            self._reject_ahead(np.ones(len(self.rows), np.bool_), "later events were before it, and the input ended")

    # ------------------------------------------------------------ leaving the quarantine
    def _settle(self) -> None:
        """Decide what the evidence so far decides; called after every arrival (it runs
        on every arrival while anything is held: cheap checks first)."""
        if not len(self.rows):
            return
        n = self.cfg.confirm_events
        if self.evidence.opposed.max() >= n:
            self._reject_ahead(self.evidence.opposed >= n, f"{n} later events of the partition were before it")
            if not len(self.rows):
                return
        if self.evidence.run.max() >= n - 1:
            self._release(self.evidence.run >= n - 1, "partition_anchors")
        elif self.clock is not None and self.evidence.ts.min() <= self.clock + self._reach:
            self._release(np.zeros(len(self.rows), np.bool_), "partition_anchors")  # what the clock caught up
        while len(self.rows) > self.cfg.max_quarantined:  # overflow: the oldest is decided as at end of input
            oldest = np.zeros(len(self.rows), np.bool_)
            oldest[0] = True
            if self.evidence.opposed[0] == 0:
                self._release(oldest, "forced_anchors")
            else:
                self._reject_ahead(oldest, "the quarantine was full and later events were before it")

    def _release(self, seed: np.ndarray, counter: str) -> None:
        """Admit the held events ``seed`` and every held event the clock they bring reaches:
        within the lateness of it, or within ``max_future_ms`` of it when nothing ever
        opposed the event (it would be in time had it arrived now). They are replayed in
        arrival order under the usual lateness rule, among themselves: the partition's
        clock cannot make one late (it was ahead of the clock when it arrived), only an
        earlier-arriving one of them or the joiner's watermark can. ``counter`` counts a
        non-empty seed that set or moved the clock."""
        lateness, future = self.cfg.allowed_lateness_ms, self.cfg.max_future_ms
        ts, unopposed = self.evidence.ts, self.evidence.opposed == 0
        if not seed.any():
            if self.clock is None:
                return  # no clock and nothing to trust
            reach = self.clock
        else:
            reach = int(ts.max(where=seed, initial=_NO_TIME if self.clock is None else self.clock))
        take = seed
        while True:  # what the clock reaches can bring the clock further
            more = ((ts <= reach + lateness) | (unopposed & (ts <= reach + future))) & ~take
            if not more.any():
                break
            take = take | more
            top = int(ts.max(where=more, initial=reach))
            if top == reach:
                break
            reach = top
        if not take.any():
            return
        rows, times = self.rows[take].tolist(), ts[take].tolist()
        self._drop(take)
        released: int | None = None  # the max ts replayed so far
        for j, t in zip(rows, times):
            limit = self.floor if released is None else max(released - lateness, self.floor)
            if t < limit:
                self.rejected.append((j, Reason.TOO_LATE, f"ts {t} < watermark {limit}"))
                continue
            self.admitted.append(j)
            released = t if released is None else max(released, t)
        if released is None:
            return
        self.anchor = released if self.anchor is None else max(self.anchor, released)
        if self.clock is None or released > self.clock:
            self.clock = released
            self.counts[counter] += int(seed.any())

    def _reject_ahead(self, mask: np.ndarray, why: str) -> None:
        now = "none yet" if self.clock is None else str(self.clock)
        for j, t in zip(self.rows[mask].tolist(), self.evidence.ts[mask].tolist()):
            self.rejected.append((j, Reason.TS_AHEAD, f"ts {t} was held on arrival: its partition had no event time "
                                                      f"or one more than {self.cfg.max_future_ms} ms before it (now {now}); "
                                                      f"{why}"))
        self._drop(mask)

    def _drop(self, mask: np.ndarray) -> None:
        keep = ~mask
        self.rows = self.rows.compress(keep)
        self.evidence = self.evidence.take(keep)

    # ------------------------------------------------------------ results
    def finish(self, out: _Collector) -> None:
        lane, pool = self.lane, self.pool
        lane.clock, lane.anchor = self.clock, self.anchor
        lane.held = pool.take(self.rows)
        lane.evidence = self.evidence
        out.admit(pool.take(np.array(self.admitted, np.int64)))
        for j, reason, detail in self.rejected:
            out.reject(pool, j, reason, detail)
        for name, n in self.counts.items():
            out.count(name, n)


def _lower_median(ts: np.ndarray) -> int:
    """The lower median: an event time at least half of ``ts`` reach (robust to a minority of bad clocks)."""
    return int(np.sort(ts)[(len(ts) - 1) // 2])
