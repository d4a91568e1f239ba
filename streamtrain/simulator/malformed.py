"""Malformed messages for robustness tests: every kind of contract violation."""

from __future__ import annotations

import numpy as np
import orjson

_VALID = {"event_id": "bad", "type": "exposure", "ts": 1, "user_id": "u", "item_id": "i", "request_id": "r"}


def _variant(rng: np.random.Generator, ts: int) -> object:
    uid = f"bad-{int(rng.integers(1 << 40))}"
    base = {**_VALID, "event_id": uid, "ts": ts}
    kind = int(rng.integers(10))
    if kind == 0:
        return bytes(rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8))
    if kind == 1:
        return [base]
    if kind == 2:
        return {k: v for k, v in base.items() if k != ["event_id", "type", "ts", "user_id", "item_id"][int(rng.integers(5))]}
    if kind == 3:
        return {**base, "ts": str(ts)}
    if kind == 4:
        return {**base, "ts": -int(rng.integers(1, 1 << 40))}
    if kind == 5:
        return {**base, "type": "purchase"}
    if kind == 6:
        return {**base, "event_id": "x" * 200}
    if kind == 7:
        return {**base, "user_features": {"segment": "y" * 200_000}}
    if kind == 8:
        return {**base, "user_id": {"nested": [1, {"junk": None}]}}
    return {**base, "ts": 10**18}


def malformed_event(rng: np.random.Generator, ts: int) -> bytes:
    value = _variant(rng, ts)
    return value if isinstance(value, bytes) else orjson.dumps(value)
