"""Global item popularity and smoothed CTR priors, behind one small protocol.

The joiner calls a :class:`PopularitySource` in event-time order:

* ``observe(...)`` with each finalised segment of accepted events;
* ``refresh()`` at every event-time refresh boundary, once every event before the
  boundary has been observed;
* lookups (``item_popularity``, ``hot_threshold``, ``ctr_priors``) for samples formed
  between two boundaries.

The owner of the checkpoints (the daemon) calls ``sync()`` right before it saves the
state, and once at a fresh start: that is where external statistics may enter.

:class:`InProcessPopularity` answers lookups from the snapshot taken at the last
``refresh()``, so a sample's popularity features depend on event time alone (replays and
re-batched input give identical samples). :class:`RedisPopularity` answers from the
stats worker's snapshots, fetched at ``sync()`` and kept in its state; its own
in-process counts stand in while Redis has nothing to give (its docstring says why that
keeps replays exact).

Hotness: an item is hot when its popularity is above the ``hot_quantile`` quantile of the
tracked items' popularities (both implementations use the same rank rule). Popularity is
the exposure count in process, the decayed exposure count from the stats worker.
CTR prior: ``(clicks + a * m) / (exposures + a)`` with ``a = ctr_prior_strength`` and
``m`` the global CTR (``default_ctr`` until something was clicked); the stats worker
computes it over decayed counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from consumers.config import PopularityConfig
from consumers.idindex import IdIndex
from consumers.ratelimit import RateLimitedLog
from consumers.schema import Action
from consumers.stats_store import StatsKeys, StatsSnapshot, read_snapshot

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class PopularitySource(Protocol):
    def observe(self, users: np.ndarray, items: np.ndarray, actions: np.ndarray, ts: np.ndarray) -> None:
        """Count a finalised segment of accepted events (1-D arrays, event-time order)."""

    def refresh(self) -> None:
        """Event-time boundary passed: later lookups may see everything observed so far."""

    def item_popularity(self, items: np.ndarray) -> np.ndarray:
        """Popularity (float64) of ``items``, any shape; 0 for unknown or 0 ids."""

    def hot_threshold(self) -> float:
        """Items with popularity strictly above this are hot."""

    def ctr_priors(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Smoothed (user CTR, item CTR) as float32 arrays shaped like the inputs."""

    def sync(self) -> None:
        """Called by the owner of the checkpoints between two polls, right before it saves
        the state (and once at a fresh start): fetch external statistics for a later
        ``refresh()`` to apply. Never raises for an unreachable store."""

    def discard_sync(self) -> None:
        """The checkpoint the last ``sync()`` was for could not be written: forget what it
        fetched, so that every snapshot the joiner uses is recorded in a checkpoint."""

    def sync_due(self) -> bool:
        """Whether ``refresh_s`` of wall time passed since the last ``sync()`` (the owner
        then checkpoints, and syncs with it). Wall time decides *when* only."""

    @property
    def counters(self) -> dict[str, int]:
        """Counters of this process (not state): what ``sync()`` found, and so on."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def rank_threshold(sorted_counts: np.ndarray, quantile: float) -> float:
    """The count at rank ``floor(quantile * (n - 1))`` of ascending counts (0 if none)."""
    if len(sorted_counts) == 0:
        return 0.0
    return float(sorted_counts[int(quantile * (len(sorted_counts) - 1))])


def smoothed_ctr(clicks: np.ndarray, exposures: np.ndarray, mean: float, strength: float) -> np.ndarray:
    return ((clicks + strength * mean) / (exposures + strength)).astype(np.float32)


class _Counts:
    """Exposure/click counters per id with an event-time snapshot."""

    def __init__(self, capacity: int) -> None:
        self.index = IdIndex(capacity)
        self.live = np.zeros((self.index.allocated, 2), np.int64)  # [:, 0] exposures, [:, 1] clicks
        self.snapshot = self.live.copy()

    def add(self, ids: np.ndarray, ts: np.ndarray, exposures: np.ndarray, clicks: np.ndarray) -> None:
        slots = self.index.insert(ids, ts)
        if self.index.allocated > len(self.live):
            self.live = np.concatenate([self.live, np.zeros((self.index.allocated - len(self.live), 2), np.int64)])
        np.add.at(self.live[:, 0], slots, exposures)
        np.add.at(self.live[:, 1], slots, clicks)

    def take_snapshot(self) -> None:
        freed = self.index.evict_over_capacity()
        self.live[freed] = 0
        self.snapshot = self.live.copy()

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Snapshot (exposures, clicks) of ``ids``: shape ``ids.shape + (2,)``."""
        slots = self.index.lookup(ids)
        known = (slots >= 0) & (slots < len(self.snapshot))
        out = np.zeros(ids.shape + (2,), np.int64)
        out[known] = self.snapshot[slots[known]]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index.state_dict(), "live": self.live.copy(), "snapshot": self.snapshot.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index.load_state_dict(state["index"])
        self.live = np.array(state["live"], np.int64).reshape(-1, 2)
        self.snapshot = np.array(state["snapshot"], np.int64).reshape(-1, 2)


class InProcessPopularity:
    """Exact counters over the events this joiner saw (bounded, LRU-evicted)."""

    def __init__(self, config: PopularityConfig) -> None:
        self.config = config
        self._items = _Counts(config.max_items)
        self._users = _Counts(config.max_users)
        self._threshold = 0.0
        self._global_ctr = config.default_ctr

    def observe(self, users: np.ndarray, items: np.ndarray, actions: np.ndarray, ts: np.ndarray) -> None:
        exposures = (actions == Action.EXPOSURE).astype(np.int64)
        clicks = (actions == Action.CLICK).astype(np.int64)
        self._items.add(items, ts, exposures, clicks)
        self._users.add(users, ts, exposures, clicks)

    def refresh(self) -> None:
        self._items.take_snapshot()
        self._users.take_snapshot()
        counts = self._items.snapshot[self._items.index.keys != 0]
        self._threshold = rank_threshold(np.sort(counts[:, 0][counts[:, 0] > 0]), self.config.hot_quantile)
        total_exposures, total_clicks = counts.sum(axis=0) if len(counts) else (0, 0)
        self._global_ctr = float(total_clicks / total_exposures) if total_clicks > 0 else self.config.default_ctr

    def item_popularity(self, items: np.ndarray) -> np.ndarray:
        return self._items.lookup(items)[..., 0].astype(np.float64)

    def hot_threshold(self) -> float:
        return self._threshold

    def ctr_priors(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        u = self._users.lookup(users)
        i = self._items.lookup(items)
        a, m = self.config.ctr_prior_strength, self._global_ctr
        return smoothed_ctr(u[..., 1], u[..., 0], m, a), smoothed_ctr(i[..., 1], i[..., 0], m, a)

    def sync(self) -> None:
        return None  # nothing external

    def discard_sync(self) -> None:
        return None

    def sync_due(self) -> bool:
        return False

    @property
    def counters(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "items": self._items.state_dict(), "users": self._users.state_dict(),
                "threshold": self._threshold, "global_ctr": self._global_ctr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"popularity state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        self._items.load_state_dict(state["items"])
        self._users.load_state_dict(state["users"])
        self._threshold = float(state["threshold"])
        self._global_ctr = float(state["global_ctr"])


class StatsCache:
    """What lookups need of one stats snapshot: per item its popularity (decayed exposures)
    and smoothed CTR, per user the smoothed CTR; ids unknown to it read the global CTR."""

    def __init__(self, clock: int, global_ctr: float, item_ids: np.ndarray, item_pop: np.ndarray,
                 item_ctr: np.ndarray, user_ids: np.ndarray, user_ctr: np.ndarray, hot_quantile: float) -> None:
        self.clock = clock  # event time the snapshot's counts are as of
        self.global_ctr = global_ctr
        self.item_ids, self.item_pop, self.item_ctr = item_ids, item_pop, item_ctr  # ids ascending
        self.user_ids, self.user_ctr = user_ids, user_ctr
        self.threshold = rank_threshold(np.sort(item_pop[item_pop > 0]).astype(np.float64), hot_quantile)

    @classmethod
    def from_snapshot(cls, snap: StatsSnapshot, hot_quantile: float) -> StatsCache:
        items, users = snap.items, snap.users
        return cls(snap.clock, snap.global_ctr, items.ids, items.column("exposures_decayed"), items.column("ctr"),
                   users.ids, users.column("ctr"), hot_quantile)

    def same(self, other: StatsCache) -> bool:
        return (self.clock == other.clock and self.global_ctr == other.global_ctr
                and all(np.array_equal(a, b) for a, b in zip(self.arrays, other.arrays)))

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        return self.item_ids, self.item_pop, self.item_ctr, self.user_ids, self.user_ctr

    @staticmethod
    def _lookup(ids: np.ndarray, values: np.ndarray, query: np.ndarray, missing: float) -> np.ndarray:
        at = np.searchsorted(ids, query)
        safe = np.minimum(at, max(len(ids) - 1, 0))
        found = (at < len(ids)) & (ids[safe] == query) if len(ids) else np.zeros(query.shape, np.bool_)
        out = np.full(query.shape, missing, values.dtype)
        out[found] = values[safe[found]]
        return out

    def item_popularity(self, items: np.ndarray) -> np.ndarray:
        return self._lookup(self.item_ids, self.item_pop, items, 0.0).astype(np.float64)

    def ctr_priors(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean = np.float32(self.global_ctr)
        return self._lookup(self.user_ids, self.user_ctr, users, mean), self._lookup(self.item_ids, self.item_ctr, items, mean)

    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock, "global_ctr": self.global_ctr, "item_ids": self.item_ids.copy(),
                "item_pop": self.item_pop.copy(), "item_ctr": self.item_ctr.copy(), "user_ids": self.user_ids.copy(),
                "user_ctr": self.user_ctr.copy()}

    @classmethod
    def from_state(cls, state: dict[str, Any], hot_quantile: float) -> StatsCache:
        f32 = {k: np.asarray(state[k], np.float32).reshape(-1) for k in ("item_pop", "item_ctr", "user_ctr")}
        i64 = {k: np.asarray(state[k], np.int64).reshape(-1) for k in ("item_ids", "user_ids")}
        return cls(int(state["clock"]), float(state["global_ctr"]), i64["item_ids"], f32["item_pop"], f32["item_ctr"],
                   i64["user_ids"], f32["user_ctr"], hot_quantile)


REDIS_FORMAT_VERSION = 2  # 2: cache, pending cache and fallback counts in the state (1 held nothing)
POPULARITY_COUNTERS = (
    "fetches",  # sync() read a snapshot
    "fetch_errors",  # sync() could not reach Redis (or read garbage): the next boundary falls back to local counts
    "fetch_missing",  # Redis was up but held no snapshot (stats worker not running, or its keys expired)
    "local_refreshes",  # boundaries after which lookups answer from the in-process counts
    "redis_refreshes",  # boundaries after which lookups answer from a stats snapshot
)


class RedisPopularity:
    """Lookups from the stats worker's snapshots (``consumers/stats_store.py``), with this
    joiner's own :class:`InProcessPopularity` counts as the fallback.

    Determinism. A snapshot enters only through ``sync()``, which the daemon calls right
    before saving a checkpoint (and at a fresh start), never from the event path. A fetched
    snapshot waits in the state as *pending*; the first ``refresh()`` (an event-time
    boundary) at which the joiner has finalised an event at or after the snapshot's clock
    makes it *active*, so every event it counted is older than any sample formed from then
    on: no label leaks into a prior. Two pending snapshots at most: the newest one already
    fetched before the latest, and the latest, so a stats worker running ahead of the
    joiner never keeps every snapshot waiting. Active cache, pending snapshots and fallback
    counts are all in ``state_dict()``: a replay from a checkpoint applies the same
    snapshots at the same boundaries whatever Redis holds by then, and what each sample's
    ``user_ctr_prior``/``item_ctr_prior`` and rank package used is a function of the
    checkpoint and the events, until the replay's own next ``sync()`` (new input, recorded in
    the checkpoint it is fetched for). A fetch that finds nothing new stages nothing, so
    extra syncs (a shutdown checkpoint, a restart) leave the state as it was — with
    unchanging statistics in Redis, a crashed and restarted run ends bit-identical to an
    uninterrupted one.

    Failure: a ``sync()`` that cannot read Redis (or finds no snapshot) drops the pending
    snapshots and stages the fallback: from the next boundary lookups answer from the
    in-process counts, until a later ``sync()`` succeeds. Counted in :attr:`counters`,
    logged at most once a minute, never raised.
    """

    def __init__(self, config: PopularityConfig, client: Any = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if client is None:
            if not config.redis_url:
                raise ValueError("RedisPopularity needs config.redis_url or a client")
            import redis  # only this backend needs it

            client = redis.Redis.from_url(config.redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self._redis = client
        self.config = config
        self.keys = StatsKeys(config.key_prefix)
        self.local = InProcessPopularity(config)
        self._active: StatsCache | None = None  # None: lookups answer from self.local
        self._pending: list[StatsCache] = []  # fetched, by clock; applied once the joiner passes their clock
        self._fallback = False  # a failed sync: local counts from the next boundary on
        self._before_sync: tuple[list[StatsCache], bool] = ([], False)  # for discard_sync
        self._seen_ts: int | None = None  # newest ts observed (finalised)
        self._clock = clock
        self._last_sync = clock()  # a restored process waits refresh_s too: its checkpoint holds a fetch
        self._unreachable_log = RateLimitedLog(60.0, clock, log)
        self._missing_log = RateLimitedLog(60.0, clock, log)
        self._counters = dict.fromkeys(POPULARITY_COUNTERS, 0)

    @property
    def source(self) -> str:
        """Where lookups answer from now: ``redis`` or ``local``."""
        return "local" if self._active is None else "redis"

    @property
    def counters(self) -> dict[str, int]:
        return {**self._counters, "source_redis": int(self._active is not None)}

    # ------------------------------------------------------------------ external input
    def sync(self) -> None:
        self._last_sync = self._clock()
        self._before_sync = (list(self._pending), self._fallback)
        try:
            snap = read_snapshot(self._redis, self.keys)
        except Exception as exc:  # noqa: BLE001 - any failure to read is "Redis unavailable": fall back, never crash
            self._counters["fetch_errors"] += 1
            self._unreachable_log.warning("popularity: cannot read stats from Redis (%s); local counts from the next "
                                 "boundary", exc, extra={"alert": "popularity_redis_unavailable"})
            self._stage(None)
            return
        if snap is None:
            self._counters["fetch_missing"] += 1
            self._missing_log.warning("popularity: no stats snapshot under %s (is `streamtrain stats` running?); local "
                                 "counts from the next boundary", self.keys.current)
            self._stage(None)
            return
        self._counters["fetches"] += 1
        self._stage(StatsCache.from_snapshot(snap, self.config.hot_quantile))

    def discard_sync(self) -> None:
        self._pending, self._fallback = self._before_sync

    def _stage(self, fetched: StatsCache | None) -> None:
        """What later boundaries apply (None: the fallback); nothing that would change nothing."""
        if fetched is None:
            self._pending, self._fallback = [], self._active is not None
        elif not (self._active is not None and self._active.same(fetched) and not self._pending):
            older = [p for p in self._pending if p.clock < fetched.clock]
            self._pending, self._fallback = [*older[-1:], fetched], False

    def sync_due(self) -> bool:
        return self._clock() - self._last_sync >= self.config.refresh_s

    # ------------------------------------------------------------------ the joiner's calls
    def observe(self, users: np.ndarray, items: np.ndarray, actions: np.ndarray, ts: np.ndarray) -> None:
        self.local.observe(users, items, actions, ts)
        if len(ts):
            self._seen_ts = max(int(ts.max()), self._seen_ts if self._seen_ts is not None else int(ts.max()))

    def refresh(self) -> None:
        self.local.refresh()
        if self._fallback:
            self._active, self._fallback = None, False
        ripe = [p for p in self._pending if self._seen_ts is not None and p.clock <= self._seen_ts]
        if ripe:
            self._active = ripe[-1]
            self._pending = [p for p in self._pending if p.clock > ripe[-1].clock]
        self._counters["local_refreshes" if self._active is None else "redis_refreshes"] += 1

    def item_popularity(self, items: np.ndarray) -> np.ndarray:
        return self.local.item_popularity(items) if self._active is None else self._active.item_popularity(items)

    def hot_threshold(self) -> float:
        return self.local.hot_threshold() if self._active is None else self._active.threshold

    def ctr_priors(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.local.ctr_priors(users, items) if self._active is None else self._active.ctr_priors(users, items)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"format_version": REDIS_FORMAT_VERSION, "local": self.local.state_dict(), "seen_ts": self._seen_ts,
                "active": None if self._active is None else self._active.state_dict(), "fallback": self._fallback,
                "pending": {str(i): p.state_dict() for i, p in enumerate(self._pending)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; a state of :class:`InProcessPopularity` (the backend was switched) becomes
        the fallback counts, with no snapshot yet. Nothing is read from Redis here."""
        version = state.get("format_version")
        if version == FORMAT_VERSION and "items" in state:
            self.local.load_state_dict(state)
            self._active, self._pending, self._fallback, self._seen_ts = None, [], False, None
            return
        if version != REDIS_FORMAT_VERSION:
            raise ValueError(f"popularity state format {version!r}, expected {REDIS_FORMAT_VERSION}")
        q = self.config.hot_quantile
        self.local.load_state_dict(state["local"])
        self._seen_ts = None if state["seen_ts"] is None else int(state["seen_ts"])
        self._active = None if state["active"] is None else StatsCache.from_state(state["active"], q)
        self._fallback = bool(state["fallback"])
        self._pending = [StatsCache.from_state(state["pending"][k], q) for k in sorted(state["pending"], key=int)]
