"""Which arriving events enter the join: per partition, in its own message order. No Kafka, no clocks.

Every decision here is a function of one partition's message sequence (and the joiner's
watermark as a floor), so it never depends on how partitions interleave.

Per partition
-------------
* **clock**: the partition's event time, the max ts of the events admitted so far (None
  before the partition is *anchored*). Its watermark is ``clock - allowed_lateness_ms``;
  an event below that (or below the joiner's watermark) is ``too_late``.
* **dedupe**: a window of recent event ids; a repeat is a producer retry, dropped and
  counted (never DLQ'd).
* **quarantine** (DESIGN §6.6, one bad clock must not discard other events): an event more
  than ``max_future_ms`` ahead of the clock is *held*, and a held event never moves the
  clock. A partition without a clock holds every event, so its very first event cannot
  anchor it alone. A held event leaves the quarantine in one of four ways:

  - **catch-up**: in-time events moved the clock up to it (within the lateness): admitted.
  - **confirmation**: ``confirm_events`` consecutive arrivals were all held and lie within
    ``max_future_ms`` of each other — a legitimate jump after a traffic gap, or the first
    events of a new partition. The partition is *anchored* at the earliest of them and the
    quarantine is replayed in arrival order: whatever is now within ``max_future_ms`` is
    admitted (too-late rules as usual), the rest stays held.
  - **rejection**: ``confirm_events`` in-time arrivals came after it and it is still ahead:
    DLQ ``ts_ahead``. So a lone far-future event costs exactly one DLQ record.
  - **overflow / end of input**: more than ``max_quarantined`` held, or ``flush`` on a
    partition without a clock: anchor at the lower median of the held ts (counted); at
    ``flush`` whatever is still ahead is ``ts_ahead``.

The fast path (an anchored partition, an empty quarantine, nothing ahead in the batch) is
vectorised; the walk in :class:`_Walk` runs only while something is held.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from consumers.config import JoinerConfig
from consumers.dedupe import DedupeWindow, PartitionedDedupe
from consumers.reasons import Reason, Rejection
from consumers.schema import EventBatch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(slots=True)
class Admitted:
    """The outcome of one :meth:`Admission.admit` (or ``flush``) call."""

    events: EventBatch  # admitted, in admission order within each partition
    rejections: list[Rejection] = field(default_factory=list)  # too_late, ts_ahead
    counts: dict[str, int] = field(default_factory=dict)  # increments of COUNTERS


COUNTERS = (
    "duplicates",  # dropped by a partition's dedupe window (idempotence, not DLQ'd)
    "events_quarantined",  # held on arrival: ahead of their partition's clock, or before it was anchored
    "partition_anchors",  # clocks set or moved by a confirmed run of held events
    "forced_anchors",  # anchors at the held median: quarantine overflow, or flush of an unanchored partition
)


@dataclass(slots=True)
class _Lane:
    """One partition's admission state."""

    held: EventBatch  # quarantined events, arrival order
    votes: np.ndarray  # (held,) int64: in-time arrivals since each held event arrived
    clock: int | None = None  # max admitted ts (at least the anchor); None = not anchored
    anchor: int | None = None  # event time of the latest confirmation (kept for repairs on load)
    streak: int = 0  # consecutive held arrivals since the last in-time one


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
            lane = self._lanes[partition] = _Lane(EventBatch.empty(self.S, self.D), np.zeros(0, np.int64))
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
            while len(chunk) and not self._fast(lane, chunk, floor, out):
                walk = _Walk(self.config, lane, chunk, floor, self.dedupe.window(p))
                walked = walk.run()  # stops once nothing is held: the rest may take the fast path
                walk.finish(out)
                chunk = chunk.take(slice(walked, None))
        return out.result()

    def _fast(self, lane: _Lane, chunk: EventBatch, floor: int, out: "_Collector") -> bool:
        """The common case in bulk; False (having changed nothing) when the walk is needed."""
        if lane.clock is None or len(lane.held):
            return False
        cfg = self.config
        ts = chunk.ts
        # The clock before each event. Too-late events never exceed it and nothing here is
        # ahead, so a plain running max over all events is the walk's clock.
        running = np.maximum.accumulate(ts)
        before = np.empty_like(running)
        before[0] = lane.clock
        np.maximum(running[:-1], lane.clock, out=before[1:])
        if (ts > before + cfg.max_future_ms).any():
            return False
        limit = np.maximum(before - cfg.allowed_lateness_ms, floor)
        late = ts < limit
        if (late & (ts > before)).any():
            return False  # only under a forced watermark: a too-late event must not move the clock
        for i in np.flatnonzero(late).tolist():
            out.reject(chunk, i, Reason.TOO_LATE, f"ts {int(ts[i])} < watermark {int(limit[i])}")
        on_time = np.flatnonzero(~late)
        fresh = self.dedupe.window(int(chunk.partition[0])).admit(chunk.eid[on_time])
        out.admit(chunk.take(on_time[fresh]))
        out.count("duplicates", int(len(fresh) - fresh.sum()))
        lane.clock = max(lane.clock, int(running[-1]))
        lane.streak = 0
        return True

    def flush(self, floor: int) -> Admitted:
        """End of input: a partition without a clock anchors at its held median; whatever
        is still held is ``ts_ahead``."""
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
        the partition's last anchor and ``known_time`` (the latest finalised event time),
        else the lower median of all staged ts — with the admission rule: an event more
        than ``max_future_ms`` ahead of the running clock is moved back into the quarantine.
        A partition that lost an event that way gets the clock its remaining evidence
        supports (None: it anchors again like a new one). Returns the staged events kept
        and the repaired partitions. For a state this code wrote, nothing changes: every
        staged event passed the same test on arrival against a clock no higher than this walk's.
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
            lane.held = EventBatch.concat([staged.take(np.array(moved, np.int64)), lane.held])
            lane.votes = np.concatenate([np.zeros(len(moved), np.int64), lane.votes])
            lane.streak = 0
            repaired.append(p)
        return staged.take(keep), repaired

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        lanes = sorted(self._lanes.items())
        return {
            "format_version": FORMAT_VERSION,
            "partitions": {str(p): {"clock": lane.clock, "anchor": lane.anchor, "streak": lane.streak}
                           for p, lane in lanes},
            "held": self.held.state_dict(),
            "votes": np.concatenate([np.zeros(0, np.int64), *(lane.votes for _, lane in lanes)]),
            "dedupe": self.dedupe.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"admission state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        self.dedupe.load_state_dict(state["dedupe"])
        held = EventBatch.from_state(state["held"], self.S, self.D)
        votes = np.asarray(state["votes"], np.int64)
        self._lanes = {}
        for p, lane in state["partitions"].items():
            mine = np.flatnonzero(held.partition == int(p))
            self._lanes[int(p)] = _Lane(held.take(mine), votes[mine].copy(),
                                        None if lane["clock"] is None else int(lane["clock"]),
                                        None if lane["anchor"] is None else int(lane["anchor"]), int(lane["streak"]))

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
    """One partition's events walked one by one in arrival order: the held events first
    (they arrived earlier), then the new ones. Works on row numbers of ``pool``; ``finish``
    writes the lane back."""

    def __init__(self, config: JoinerConfig, lane: _Lane, new: EventBatch, floor: int, window: DedupeWindow) -> None:
        self.cfg = config
        self.lane = lane
        self.pool = EventBatch.concat([lane.held, new])
        self.first_new = len(lane.held)
        self.ts: list[int] = self.pool.ts.tolist()
        self.floor = floor
        self.window = window
        self.clock, self.anchor, self.streak = lane.clock, lane.anchor, lane.streak
        self.held: list[int] = list(range(self.first_new))
        self.votes: list[int] = lane.votes.tolist()
        self.admitted: list[int] = []
        self.rejected: list[tuple[int, Reason, str]] = []
        self.counts = dict.fromkeys(COUNTERS, 0)

    # ------------------------------------------------------------ arrivals
    def run(self) -> int:
        """Walk the new events until the partition is anchored with nothing held; returns
        how many new events were walked."""
        eids = self.pool.eid.tolist()
        for i in range(self.first_new, len(self.ts)):
            if self._is_ahead(self.ts[i]):
                if self.window.add(eids[i]):
                    self._hold(i)
                else:
                    self.counts["duplicates"] += 1
            else:
                self._in_time(i, eids[i])
            if self.clock is not None and not self.held:
                return i + 1 - self.first_new
        return len(self.ts) - self.first_new

    def end_of_input(self) -> None:
        if self.clock is None and self.held:
            self._anchor(_lower_median(np.array([self.ts[j] for j in self.held])), forced=True)
        for j in self.held:
            self._reject_ahead(j, "unconfirmed at end of input")
        self.held, self.votes = [], []

    def _horizon(self) -> int | None:
        """Events above this are ahead: ``max_future_ms`` past the clock (or the anchor)."""
        known = [t for t in (self.clock, self.anchor) if t is not None]
        return max(known) + self.cfg.max_future_ms if known else None

    def _is_ahead(self, ts: int) -> bool:
        horizon = self._horizon()
        return horizon is None or ts > horizon

    def _hold(self, i: int) -> None:
        self.held.append(i)
        self.votes.append(0)
        self.streak += 1
        self.counts["events_quarantined"] += 1
        n = self.cfg.confirm_events
        if self.streak >= n:
            run = [self.ts[j] for j in self.held[-n:]]
            if max(run) - min(run) <= self.cfg.max_future_ms:
                self._anchor(min(run), forced=False)
                return
        if len(self.held) > self.cfg.max_quarantined:
            self._anchor(_lower_median(np.array([self.ts[j] for j in self.held])), forced=True)

    def _in_time(self, i: int, eid: int | None) -> None:
        """An event within the horizon (``eid`` None: replayed from the quarantine, its id
        already claimed). Every in-time arrival counts against what is held."""
        ts = self.ts[i]
        limit = self.floor if self.clock is None else max(self.clock - self.cfg.allowed_lateness_ms, self.floor)
        if ts < limit:
            self.rejected.append((i, Reason.TOO_LATE, f"ts {ts} < watermark {limit}"))
        else:
            if eid is None or self.window.add(eid):
                self.admitted.append(i)
            else:
                self.counts["duplicates"] += 1
            self.clock = ts if self.clock is None else max(self.clock, ts)
        self.streak = 0
        if self.held:
            self.votes = [v + 1 for v in self.votes]
            self._catch_up()
            self._expire()

    # ------------------------------------------------------------ leaving the quarantine
    def _catch_up(self) -> None:
        """Admit held events the partition's time has reached: within the lateness of the
        clock, admitting one moves the clock no more than ordinary disorder does."""
        if self.clock is None:
            return
        reached = self.clock + self.cfg.allowed_lateness_ms
        caught = [self.ts[j] <= reached for j in self.held]
        if not any(caught):
            return
        for j, now in zip(self.held, caught):
            if now:
                self.admitted.append(j)
                self.clock = max(self.clock, self.ts[j])
        self.held = [j for j, now in zip(self.held, caught) if not now]
        self.votes = [v for v, now in zip(self.votes, caught) if not now]

    def _expire(self) -> None:
        """Held events outvoted by ``confirm_events`` in-time arrivals: ``ts_ahead``."""
        n = self.cfg.confirm_events
        if not self.votes or max(self.votes) < n:
            return
        for j, v in zip(self.held, self.votes):
            if v >= n:
                self._reject_ahead(j, f"{v} later events of the partition stayed behind it")
        keep = [k for k, v in enumerate(self.votes) if v < n]
        self.held = [self.held[k] for k in keep]
        self.votes = [self.votes[k] for k in keep]

    def _anchor(self, at: int, forced: bool) -> None:
        """Trust event time ``at`` and replay the quarantine (arrival order) against it."""
        self.counts["forced_anchors" if forced else "partition_anchors"] += 1
        self.anchor = at if self.anchor is None else max(self.anchor, at)
        replay, votes = self.held, self.votes
        self.held, self.votes, self.streak = [], [], 0
        for j, v in zip(replay, votes):
            if self._is_ahead(self.ts[j]):
                self.held.append(j)
                self.votes.append(v)
            else:
                self._in_time(j, None)
        self.clock = at if self.clock is None else max(self.clock, at)

    def _reject_ahead(self, j: int, why: str) -> None:
        reference = "none" if self.clock is None else str(self.clock)
        self.rejected.append((j, Reason.TS_AHEAD, f"ts {self.ts[j]} more than {self.cfg.max_future_ms} ms ahead of "
                                                 f"its partition's event time {reference}; {why}"))

    # ------------------------------------------------------------ results
    def finish(self, out: _Collector) -> None:
        lane, pool = self.lane, self.pool
        lane.clock, lane.anchor, lane.streak = self.clock, self.anchor, self.streak
        lane.held = pool.take(np.array(self.held, np.int64))
        lane.votes = np.array(self.votes, np.int64)
        out.admit(pool.take(np.array(self.admitted, np.int64)))
        for j, reason, detail in self.rejected:
            out.reject(pool, j, reason, detail)
        for name, n in self.counts.items():
            out.count(name, n)


def _lower_median(ts: np.ndarray) -> int:
    """The lower median: an event time at least half of ``ts`` reach (robust to a minority of bad clocks)."""
    return int(np.sort(ts)[(len(ts) - 1) // 2])
