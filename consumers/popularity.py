"""Global item popularity and smoothed CTR priors, behind one small protocol.

The joiner calls a :class:`PopularitySource` in event-time order:

* ``observe(...)`` with each finalised segment of accepted events;
* ``refresh()`` at every event-time refresh boundary, once every event before the
  boundary has been observed;
* lookups (``item_popularity``, ``hot_threshold``, ``ctr_priors``) for samples formed
  between two boundaries.

:class:`InProcessPopularity` answers lookups from the snapshot taken at the last
``refresh()``, so a sample's popularity features depend on event time alone (replays and
re-batched input give identical samples). :class:`RedisPopularity` reads what the stats
app keeps in Redis; it is live external state, so those features are not replay-exact.

Hotness: an item is hot when its exposure count is above the ``hot_quantile`` quantile of
the tracked items' counts (both implementations use the same rank rule).
CTR prior: ``(clicks + a * m) / (exposures + a)`` with ``a = ctr_prior_strength`` and
``m`` the global CTR (``default_ctr`` until something was clicked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from consumers.config import PopularityConfig
from consumers.idindex import IdIndex
from consumers.schema import Action

FORMAT_VERSION = 1


class PopularitySource(Protocol):
    def observe(self, users: np.ndarray, items: np.ndarray, actions: np.ndarray, ts: np.ndarray) -> None:
        """Count a finalised segment of accepted events (1-D arrays, event-time order)."""

    def refresh(self) -> None:
        """Event-time boundary passed: later lookups may see everything observed so far."""

    def item_popularity(self, items: np.ndarray) -> np.ndarray:
        """Exposure counts (float64) of ``items``, any shape; 0 for unknown or 0 ids."""

    def hot_threshold(self) -> float:
        """Items with popularity strictly above this are hot."""

    def ctr_priors(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Smoothed (user CTR, item CTR) as float32 arrays shaped like the inputs."""

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


@dataclass(frozen=True)
class RedisStatsKeys:
    """The Redis layout the stats app writes and :class:`RedisPopularity` reads.
    Members/fields are ``str(hash_id(raw_id))`` (decimal int64), counts are numbers."""

    prefix: str = "streamtrain:"

    @property
    def item_exposures(self) -> str:  # sorted set: item -> exposure count (rank = popularity order)
        return f"{self.prefix}pop:item_exposures"

    @property
    def item_clicks(self) -> str:  # hash: item -> click count
        return f"{self.prefix}pop:item_clicks"

    @property
    def user_exposures(self) -> str:  # hash: user -> exposure count
        return f"{self.prefix}pop:user_exposures"

    @property
    def user_clicks(self) -> str:  # hash: user -> click count
        return f"{self.prefix}pop:user_clicks"

    @property
    def totals(self) -> str:  # hash: {"exposures": n, "clicks": n}
        return f"{self.prefix}pop:totals"


class RedisPopularity:
    """Reads popularity and CTR counters from Redis; ``observe`` is a no-op (the stats app
    counts). The hot threshold and the global CTR are re-read at each ``refresh()``.
    ``client`` defaults to one connected to ``config.redis_url``."""

    def __init__(self, config: PopularityConfig, client: Any = None) -> None:
        if client is None:
            if not config.redis_url:
                raise ValueError("RedisPopularity needs config.redis_url or a client")
            import redis  # only this backend needs it

            client = redis.Redis.from_url(config.redis_url)
        self._redis = client
        self.config = config
        self.keys = RedisStatsKeys(config.key_prefix)
        self._threshold = 0.0
        self._global_ctr = config.default_ctr

    def observe(self, users: np.ndarray, items: np.ndarray, actions: np.ndarray, ts: np.ndarray) -> None:
        return None

    def refresh(self) -> None:
        k = self.keys
        n = int(self._redis.zcard(k.item_exposures))
        if n:
            rank = int(self.config.hot_quantile * (n - 1))
            (_, score), = self._redis.zrange(k.item_exposures, rank, rank, withscores=True)
            self._threshold = float(score)
        exposures, clicks = self._redis.hmget(k.totals, ["exposures", "clicks"])
        exposures, clicks = float(exposures or 0), float(clicks or 0)
        self._global_ctr = clicks / exposures if exposures > 0 and clicks > 0 else self.config.default_ctr

    def _read(self, ids: np.ndarray, reader: Any) -> np.ndarray:
        uniq, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        values = np.zeros(len(uniq), np.float64)
        wanted = uniq != 0
        if wanted.any():
            got = reader([str(v) for v in uniq[wanted].tolist()])
            values[wanted] = [float(v) if v is not None else 0.0 for v in got]
        return values[inverse].reshape(ids.shape)

    def item_popularity(self, items: np.ndarray) -> np.ndarray:
        return self._read(items, lambda members: self._redis.zmscore(self.keys.item_exposures, members))

    def hot_threshold(self) -> float:
        return self._threshold

    def ctr_priors(self, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k, r = self.keys, self._redis
        user_exp = self._read(users, lambda f: r.hmget(k.user_exposures, f))
        user_clk = self._read(users, lambda f: r.hmget(k.user_clicks, f))
        item_exp = self.item_popularity(items)
        item_clk = self._read(items, lambda f: r.hmget(k.item_clicks, f))
        a, m = self.config.ctr_prior_strength, self._global_ctr
        return smoothed_ctr(user_clk, user_exp, m, a), smoothed_ctr(item_clk, item_exp, m, a)

    def state_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION}  # Redis holds the counters

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"popularity state format {state.get('format_version')!r}, expected {FORMAT_VERSION}")
        self.refresh()  # the derived threshold/global CTR are not stored: re-read them
