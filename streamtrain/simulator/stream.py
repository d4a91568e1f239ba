"""Deterministic event stream of the simulated world.

Exposures are generated request by request in event time; their clicks and conversions
are scheduled after lognormal delays and every event gets a small arrival jitter, so the
stream is (as in production) mostly but not strictly ordered by event time. Everything is
drawn from generators seeded by ``config.seed``; malformed events come from their own
generator so ``bad_fraction`` never changes the valid events.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from streamtrain.simulator.config import DriftSpec, SimulatorConfig
from streamtrain.simulator.malformed import malformed_event
from streamtrain.simulator.world import DEVICE_PROBS, DEVICES, SHIFTED_DEVICE_PROBS, World

MS = 1000


@dataclass(frozen=True)
class SimEvent:
    """One message to produce. ``truth`` is set on exposures only."""

    arrival_ts: int
    key: bytes
    value: bytes
    valid: bool
    truth: dict[str, Any] | None = None


@dataclass(order=True)
class _Pending:
    arrival_ts: int
    seq: int
    event: SimEvent = field(compare=False)


@dataclass
class ActiveDrifts:
    ctr_odds: float = 1.0
    feature_shift: float | None = None
    concept_shift: bool = False
    broken: list[DriftSpec] = field(default_factory=list)


def active_drifts(drifts: list[DriftSpec], exposure_count: int) -> ActiveDrifts:
    state = ActiveDrifts()
    for d in drifts:
        if not (d.at_event <= exposure_count and (d.until_event is None or exposure_count < d.until_event)):
            continue
        if d.kind == "label_shift":
            state.ctr_odds *= d.magnitude
        elif d.kind == "feature_shift":
            state.feature_shift = d.magnitude
        elif d.kind == "concept_shift":
            state.concept_shift = True
        else:
            state.broken.append(d)
    return state


class EventStream:
    def __init__(self, config: SimulatorConfig) -> None:
        self.cfg = config
        self.world = World(config)
        self._rng = np.random.default_rng([config.seed, 1])
        self._bad_rng = np.random.default_rng([config.seed, 2])
        self._item_cdf = np.cumsum(self.world.item_probs)
        self._heap: list[_Pending] = []
        self._seq = 0
        self.exposures = 0

    def __iter__(self) -> Iterator[SimEvent]:
        cfg = self.cfg
        now = cfg.start_ts_ms
        request = 0
        while cfg.exposures is None or self.exposures < cfg.exposures:
            now += max(1, int(self._rng.exponential(MS / cfg.requests_per_event_second)))
            self._request(now, request)
            request += 1
            yield from self._drain(until=now)
        yield from self._drain(until=None)

    def _drain(self, until: int | None) -> Iterator[SimEvent]:
        while self._heap and (until is None or self._heap[0].arrival_ts <= until):
            event = heapq.heappop(self._heap).event
            yield event
            if self.cfg.bad_fraction and self._bad_rng.random() < self.cfg.bad_fraction:
                yield SimEvent(event.arrival_ts, event.key, malformed_event(self._bad_rng, event.arrival_ts), valid=False)

    def _push(self, ts: int, key: bytes, payload: dict[str, Any], truth: dict[str, Any] | None = None) -> None:
        arrival = ts + int(self._rng.exponential(self.cfg.arrival_jitter_ms)) if self.cfg.arrival_jitter_ms else ts
        event = SimEvent(arrival, key, orjson.dumps(payload), valid=True, truth=truth)
        heapq.heappush(self._heap, _Pending(arrival, self._seq, event))
        self._seq += 1

    def _request(self, now: int, request: int) -> None:
        cfg, world, rng = self.cfg, self.world, self._rng
        user = int(rng.integers(cfg.users))
        items = np.unique(np.searchsorted(self._item_cdf, rng.random(cfg.items_per_request)).clip(0, cfg.items - 1))
        hour = (now // (3600 * MS)) % 24
        drift = active_drifts(cfg.drifts, self.exposures)
        p_ctr, p_cvr = world.probabilities(user, items, int(hour), concept_shift=drift.concept_shift, ctr_odds=drift.ctr_odds)
        clicks = rng.random(len(items)) < p_ctr
        converts = clicks & (rng.random(len(items)) < p_cvr)
        click_delays = rng.lognormal(np.log(cfg.click_delay_median_s), 0.8, len(items)) * MS
        convert_delays = np.minimum(rng.lognormal(np.log(cfg.convert_delay_median_s), 1.0, len(items)), cfg.max_convert_delay_s) * MS
        device_probs = SHIFTED_DEVICE_PROBS if drift.feature_shift is not None else DEVICE_PROBS
        device = DEVICES[int(np.searchsorted(np.cumsum(device_probs), rng.random()))]
        key = f"u{user}".encode()
        request_id = f"s{cfg.seed}-r{request}"
        for j, item in enumerate(items.tolist()):
            event_id = f"s{cfg.seed}-x{self.exposures}"
            price = float(world.item_price[item]) * (drift.feature_shift or 1.0)
            features = {
                "user": {"segment": f"s{world.user_segment[user]}"},
                "item": {"category": f"c{world.item_category[item]}", "price": round(price, 2)},
                "context": {"device": device},
            }
            for broken in drift.broken:
                scope, _, name = broken.feature.partition(".")
                features[scope][name] = self._broken_value(broken, features[scope].get(name))
            base = {"user_id": f"u{user}", "item_id": f"i{item}", "request_id": request_id}
            truth = {"event_id": event_id, "ts": now, "p_ctr": float(p_ctr[j]), "p_cvr": float(p_cvr[j]),
                     "click": int(clicks[j]), "convert": int(converts[j])}
            self._push(now, key, {"event_id": event_id, "type": "exposure", "ts": now, **base,
                                  "user_features": features["user"], "item_features": features["item"],
                                  "context": features["context"]}, truth)
            if clicks[j]:
                click_ts = now + int(click_delays[j])
                self._push(click_ts, key, {"event_id": f"{event_id}-c", "type": "click", "ts": click_ts, **base})
                if converts[j]:
                    convert_ts = click_ts + int(convert_delays[j])
                    self._push(convert_ts, key, {"event_id": f"{event_id}-v", "type": "convert", "ts": convert_ts, **base})
            self.exposures += 1

    def _broken_value(self, spec: DriftSpec, original: Any) -> Any:
        numeric = isinstance(original, (int, float))
        if spec.broken_mode == "constant":
            return 0.0 if numeric else "unknown"
        if numeric:
            return float(self._rng.uniform(-1e6, 1e6))
        return f"garbage-{int(self._rng.integers(1 << 30))}"
