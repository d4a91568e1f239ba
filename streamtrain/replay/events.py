"""Turn interactions into events of the contract (docs/events.md), in event-time order.

Every interaction is an exposure; one whose rating reaches ``click_threshold`` is also a
click ``click_delay_ms`` later, and one that reaches ``convert_threshold`` (clicked too)
a conversion ``convert_delay_ms`` after the click. A user's interactions in the same
second form one request (one page of a feed). Ids come from the source line, so a replay
of the same file gives the same events, byte for byte.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson

from consumers.decode import key_for_user
from streamtrain.replay.readers import Interactions, ReplayError

WEEK_MS = 7 * 24 * 3600 * 1000
_KIND_NAMES = ("exposure", "click", "convert")


@dataclass(frozen=True)
class ReplayRules:
    click_threshold: float | None = 4.0  # MovieLens: 4 and 5 stars read as a click; None: no clicks
    convert_threshold: float | None = None  # e.g. 5: a 5-star click also converts; None: no conversions
    click_delay_ms: int = 1_000  # well inside the joiner's click window
    convert_delay_ms: int = 2_000  # after the click, well inside the convert window
    id_prefix: str = "replay"  # event and request ids: "<prefix>:<line>:x"; make it unique per file
    time_shift_ms: int = 0  # added to every timestamp (see week_shift)


@dataclass(frozen=True)
class Event:
    """One message to produce (the shape the simulator's sinks take)."""

    arrival_ts: int  # event time, ms, after the shift (also the Kafka message timestamp)
    key: bytes  # the message key: the user id (DESIGN §3)
    value: bytes  # the JSON event
    kind: str  # exposure | click | convert
    valid: bool = True  # every replayed event is valid by construction


def week_shift(first_ts_ms: int, last_ts_ms: int, min_ts_ms: int, max_ts_ms: int) -> int:
    """The smallest shift, in whole weeks, that brings [first, last] inside [min, max]: whole
    weeks keep every event's hour of day and weekday (the time features). 0 if it fits."""
    if first_ts_ms >= min_ts_ms and last_ts_ms <= max_ts_ms:
        return 0
    if last_ts_ms - first_ts_ms > max_ts_ms - min_ts_ms:
        raise ReplayError("the log spans more time than the decoder's [min_ts_ms, max_ts_ms] allows")
    weeks = math.ceil((min_ts_ms - first_ts_ms) / WEEK_MS) if first_ts_ms < min_ts_ms else \
        -math.ceil((last_ts_ms - max_ts_ms) / WEEK_MS)
    shift = weeks * WEEK_MS
    if first_ts_ms + shift < min_ts_ms or last_ts_ms + shift > max_ts_ms:
        raise ReplayError("no whole-week shift fits the log inside the decoder's [min_ts_ms, max_ts_ms]")
    return shift


def build_events(rows: Interactions, rules: ReplayRules) -> Iterator[Event]:
    """The events of ``rows`` in event-time order (ties: exposure, click, convert; then line)."""
    n = len(rows)
    clicked = np.zeros(n, bool) if rules.click_threshold is None else rows.rating >= rules.click_threshold
    converted = clicked & (np.zeros(n, bool) if rules.convert_threshold is None else rows.rating >= rules.convert_threshold)
    ts = rows.ts_ms + rules.time_shift_ms
    which = np.concatenate([np.arange(n), np.flatnonzero(clicked), np.flatnonzero(converted)])
    kind = np.concatenate([np.zeros(n, np.int8), np.ones(int(clicked.sum()), np.int8),
                           np.full(int(converted.sum()), 2, np.int8)])
    when = ts[which] + np.where(kind >= 1, rules.click_delay_ms, 0) + np.where(kind == 2, rules.convert_delay_ms, 0)
    order = np.lexsort((rows.line[which], kind, when))
    prefix = rules.id_prefix
    for i, k, t in zip(which[order].tolist(), kind[order].tolist(), when[order].tolist()):
        user, item, line = rows.user[i], rows.item[i], int(rows.line[i])
        event = {"event_id": f"{prefix}:{line}:{'xcv'[k]}", "type": _KIND_NAMES[k], "ts": t,
                 "user_id": user, "item_id": item, "request_id": f"{prefix}:{user}:{int(rows.ts_ms[i]) // 1000}"}
        yield Event(t, key_for_user(user), orjson.dumps(event), _KIND_NAMES[k])
