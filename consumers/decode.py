"""Decode and validate raw event messages (DESIGN §3) into a columnar :class:`EventBatch`.

Pure: bytes in, arrays and :class:`~consumers.reasons.Rejection` records out. Every
message becomes exactly one of the two; nothing raises on bad input. Checks run in a
fixed order, so a message with several problems always gets the same reason.
``docs/events.md`` is the user-facing contract this module enforces.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import numpy as np
import orjson

from consumers.config import DecoderConfig
from consumers.fastdecode import ROW_FIELDS, FastDecoder, Row
from consumers.hashing import HashMemo, hash_ids, hash_unique, mix_ids
from consumers.reasons import Reason, Rejection
from consumers.repeats import repeated_name
from consumers.schema import MAX_EVENT_ID_LEN, Action, EventBatch

_TYPE_CODES = {"exposure": int(Action.EXPOSURE), "click": int(Action.CLICK), "convert": int(Action.CONVERT)}
_EXPOSURE = int(Action.EXPOSURE)
_REQUIRED = ("event_id", "type", "ts", "user_id", "item_id", "request_id")
_FEATURE_SCOPES = {"user": "user_features", "item": "item_features", "context": "context"}
_SCOPE_FIELDS = tuple(_FEATURE_SCOPES.values())
_SCALAR_TYPES = frozenset((str, int, float))
_STR_OR_NONE = frozenset((str, type(None)))
_FEATURE_MEMO = 1 << 16  # distinct values remembered per sparse feature
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc, fixed across Unicode versions
_INT64: Final = 2**63

DECODE_COUNTERS = (  # accepted events with a degraded feature value, counted per value
    "dense_type_mismatches",  # a declared dense feature sent as a string ("12.5" too): NaN
    "dense_out_of_range",  # a declared dense feature beyond float32 range (|v| > 3.4e38): NaN
    "sparse_inexact_numbers",  # a sparse feature number with |v| >= 2^63: hashed by its double value
)


class Unkeyed(Enum):
    """Type of :data:`UNKEYED`."""

    UNKEYED = "unkeyed"


UNKEYED: Final = Unkeyed.UNKEYED  # "no message key known": the key rule is not checked


@dataclass(slots=True)
class Decoded:
    events: EventBatch
    rejections: list[Rejection]
    counters: dict[str, int]  # DECODE_COUNTERS of this call


class _Invalid(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        self.reason = reason
        self.detail = detail


class EventDecoder:
    """Turn message values into events; ``sparse``/``dense`` are the declared
    ``<scope>.<name>`` features, in column order. ``clock`` (ms since epoch) is read only
    when ``max_clock_skew_ms`` is set.

    A native fast path (:mod:`consumers.fastdecode`) decodes well-formed events; anything
    it does not vouch for goes through :meth:`validate`, the authoritative check that
    names the reason. Columns are then filled over the whole batch at once.
    """

    def __init__(self, config: DecoderConfig, sparse: Sequence[str], dense: Sequence[str],
                 clock: Callable[[], int] | None = None) -> None:
        self.config = config
        self._names = (tuple(sparse), tuple(dense))
        scope_index = {scope: i for i, scope in enumerate(_FEATURE_SCOPES)}
        # per sparse feature: scope, name, "scope.name", memo of value -> hash (None -> 0: missing)
        self._sparse: list[tuple[int, str, str, dict[Any, int]]] = [
            (scope_index[s], n, f"{s}.{n}", {None: 0}) for s, _, n in (f.partition(".") for f in sparse)]
        self._dense = [(scope_index[s], n) for s, _, n in (f.partition(".") for f in dense)]
        self._memo = HashMemo()
        self._fast = FastDecoder(config.min_ts_ms, config.max_ts_ms, config.max_id_chars)
        if config.max_clock_skew_ms is not None and clock is None:
            raise ValueError("max_clock_skew_ms needs a clock")
        self._clock = clock

    @property
    def features(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The declared (sparse, dense) feature names, in column order."""
        return self._names

    def decode(self, values: Sequence[bytes | None], partitions: Sequence[int], offsets: Sequence[int],
               keys: Sequence[bytes | None] | None = None) -> Decoded:
        """``keys``: the message keys, checked against each event's user_id (DESIGN §3)
        when ``config.check_key``; None when the caller has no keys (values replayed
        from a file): the key rule is then not checked."""
        cfg = self.config
        max_ts = cfg.max_ts_ms
        if self._clock is not None and cfg.max_clock_skew_ms is not None:
            max_ts = min(max_ts, self._clock() + cfg.max_clock_skew_ms)
        if not cfg.check_key:
            keys = None
        n = len(values)
        if None not in values and 0 < min(map(len, values), default=1) and max(map(len, values), default=0) <= cfg.max_message_bytes:
            columns, ok = self._fast.columns(values, max_ts, keys)  # type: ignore[arg-type]  # no None among them
        else:  # tombstones or size outliers: the slow path rejects them, the fast path takes the others
            sized = [i for i, v in enumerate(values) if v and len(v) <= cfg.max_message_bytes]
            part, part_ok = self._fast.columns([values[i] for i in sized], max_ts,  # type: ignore[misc]
                                               None if keys is None else [keys[i] for i in sized])
            columns = [[None] * n for _ in ROW_FIELDS]
            for column, values_of in zip(columns, part):
                for i, value in zip(sized, values_of):
                    column[i] = value
            ok = np.zeros(n, bool)
            ok[sized] = part_ok
        rejections: list[Rejection] = []
        if not ok.all():
            for i in np.flatnonzero(~ok).tolist():
                verdict = self._slow(values[i], max_ts, UNKEYED if keys is None else keys[i])
                if type(verdict) is tuple:
                    ok[i] = True
                    for column, value in zip(columns, verdict):
                        column[i] = value
                else:
                    rejections.append(Rejection(*verdict, values[i], partitions[i], offsets[i]))  # type: ignore[misc]
        keep = np.flatnonzero(ok)
        if len(keep) < n:
            at = keep.tolist()
            columns = [[column[i] for i in at] for column in columns]
            values = [values[i] for i in at]
        counters = dict.fromkeys(DECODE_COUNTERS, 0)
        events = self._columns(columns, values, np.asarray(partitions, np.int32)[keep],  # type: ignore[arg-type]
                               np.asarray(offsets, np.int64)[keep], counters)
        return Decoded(events, rejections, counters)

    def _slow(self, value: bytes | None, max_ts: int, key: bytes | None | Unkeyed) -> Row | list[Any]:
        """The authoritative path for one message the fast path did not vouch for: its
        row, or ``[reason, detail]``."""
        cfg = self.config
        if not value:
            return [Reason.EMPTY, "null or empty message value"]
        if len(value) > cfg.max_message_bytes:
            return [Reason.OVERSIZED, f"{len(value)} bytes > {cfg.max_message_bytes}"]
        try:
            ev = orjson.loads(value)
        except orjson.JSONDecodeError as exc:
            return [Reason.NOT_JSON, str(exc)[:200]]
        problem = self.validate(ev, max_ts, raw=value, key=key)
        if problem is not None:
            return list(problem)
        return tuple(ev.get(name) for name in ROW_FIELDS)

    def _columns(self, columns: list[list[Any]], values: list[bytes], partitions: np.ndarray, offsets: np.ndarray,
                 counters: dict[str, int]) -> EventBatch:
        """Accepted events (one list per :data:`ROW_FIELDS` entry) to an EventBatch:
        hashing and features vectorised over the batch."""
        n = len(values)
        if n == 0:
            return EventBatch.empty(len(self._sparse), len(self._dense))
        eid, kind, ts, user, item, request, *scopes = columns
        etype = np.array(list(map(_TYPE_CODES.__getitem__, kind)), np.int8)
        item_arr = self._memo.many(item)
        exposures = np.flatnonzero(etype == _EXPOSURE)
        sparse = np.zeros((n, len(self._sparse)), np.int64)
        dense = np.full((n, len(self._dense)), np.nan, np.float32)
        if len(exposures):
            at = exposures.tolist()
            feature_objects = [[column[i] for i in at] for column in scopes]
            self._features(feature_objects, exposures, sparse, dense, counters)
        return EventBatch(
            ts=np.array(ts, np.int64),
            etype=etype,
            eid=hash_ids(eid),
            user=self._memo.many(user),
            item=item_arr,
            key=mix_ids(hash_unique(request), item_arr),
            partition=partitions,
            offset=offsets,
            sparse=sparse,
            dense=dense,
            raw=_object_array(values),
        )

    def validate(self, ev: object, max_ts: int | None = None, *, raw: bytes | None = None,
                 key: bytes | None | Unkeyed = UNKEYED) -> tuple[Reason, str] | None:
        """The contract for a parsed message, checked in a fixed order: ``(reason,
        detail)`` of the first violation, or None. (Empty, oversized and unparseable
        messages are rejected before parsing.) ``raw``: the bytes ``ev`` was parsed from,
        needed to see repeated names (parsing keeps the last); None skips that check.
        ``key``: the message key for the key rule; :data:`UNKEYED` skips it."""
        try:
            self._check(ev, self.config.max_ts_ms if max_ts is None else max_ts, raw, key)
        except _Invalid as bad:
            return bad.reason, bad.detail
        return None

    def _check(self, ev: object, max_ts: int, raw: bytes | None, key: bytes | None | Unkeyed) -> None:
        if type(ev) is not dict:
            raise _Invalid(Reason.NOT_OBJECT, f"top level is {type(ev).__name__}")
        if raw is not None and (repeated := _repeated_name(raw, ev)) is not None:
            raise _Invalid(Reason.DUPLICATE_FIELD, f"{repeated[:100]} appears twice")
        for name in _REQUIRED:
            if name not in ev:
                raise _Invalid(Reason.MISSING_FIELD, name)
        event_id = ev["event_id"]
        if type(event_id) is not str or not event_id:
            raise _Invalid(Reason.BAD_TYPE, "event_id must be a non-empty string")
        if len(event_id) > MAX_EVENT_ID_LEN:
            raise _Invalid(Reason.EVENT_ID_TOO_LONG, f"{len(event_id)} chars > {MAX_EVENT_ID_LEN}")
        if _bad_id(event_id):
            raise _Invalid(Reason.BAD_ID, f"event_id {event_id[:100]!r} is whitespace or has a control character")
        kind = ev["type"]
        if type(kind) is not str:
            raise _Invalid(Reason.BAD_TYPE, "type must be a string")
        if kind not in _TYPE_CODES:
            raise _Invalid(Reason.UNKNOWN_TYPE, kind[:100])
        ts = ev["ts"]
        if type(ts) is not int:
            raise _Invalid(Reason.BAD_TYPE, "ts must be an integer within 64 bits (ms since epoch)")
        if not self.config.min_ts_ms <= ts <= max_ts:
            raise _Invalid(Reason.BAD_TS, f"ts {ts} outside [{self.config.min_ts_ms}, {max_ts}]")
        max_id = self.config.max_id_chars
        for name in ("user_id", "item_id", "request_id"):
            value = ev[name]
            kind_ok = type(value) is str or (type(value) is int and name != "request_id")
            if not kind_ok or value == "":
                raise _Invalid(Reason.BAD_TYPE, f"{name} must be a non-empty string"
                               + (" or an integer within 64 bits" if name != "request_id" else ""))
            if type(value) is str and len(value) > max_id:
                raise _Invalid(Reason.ID_TOO_LONG, f"{name}: {len(value)} chars > {max_id}")
            if type(value) is str and _bad_id(value):
                raise _Invalid(Reason.BAD_ID, f"{name} {value[:100]!r} is whitespace or has a control character")
        for scope in _SCOPE_FIELDS:
            feats = ev.get(scope)
            if feats is None:
                continue
            if type(feats) is not dict:
                raise _Invalid(Reason.BAD_TYPE, f"{scope} must be an object")
            for name, value in feats.items():
                if type(value) not in _SCALAR_TYPES:
                    raise _Invalid(Reason.BAD_TYPE, f"{scope}.{name[:100]} must be a string or number")
        if key is UNKEYED or not self.config.check_key:
            return
        if key is None:
            raise _Invalid(Reason.MISSING_KEY, "message key is null; it must be the user_id")
        if key != key_for_user(ev["user_id"]):
            raise _Invalid(Reason.KEY_MISMATCH, f"key {key[:100]!r} is not user_id {ev['user_id']!r}"[:300])

    def _features(self, scopes: list[list[dict[str, Any] | None]], rows: np.ndarray, sparse: np.ndarray,
                  dense: np.ndarray, counters: dict[str, int]) -> None:
        """Fill the declared features of the exposures at ``rows`` (``scopes``: their
        user, item and context objects, column by column); count degraded values."""
        for column, (scope, name, full, cache) in enumerate(self._sparse):
            values = [d.get(name) if d else None for d in scopes[scope]]
            sparse[rows, column] = self._sparse_hashes(values, full, cache, counters)
        for column, (scope, name) in enumerate(self._dense):
            values = [d.get(name) if d else None for d in scopes[scope]]
            types = list(map(type, values))
            # A number sent as a string is a producer/config type mismatch, not parsed: float()
            # would also take "nan", "1_000" and " 12 ", a second contract nobody wrote down.
            counters["dense_type_mismatches"] += types.count(str)
            if types.count(str) or types.count(type(None)):
                values = [v if t is float or t is int else math.nan for v, t in zip(values, types)]
            with np.errstate(over="ignore"):
                column_values = np.array(values, np.float64).astype(np.float32)
            overflow = np.isinf(column_values)  # JSON has no inf literal: every inf is a float32 overflow
            if overflow.any():
                column_values[overflow] = np.nan  # beyond float32 range: as good as missing
                counters["dense_out_of_range"] += int(overflow.sum())
            dense[rows, column] = column_values

    @staticmethod
    def _sparse_hashes(values: list[Any], full: str, cache: dict[Any, int], counters: dict[str, int]) -> list[int]:
        """hash_feature(full, value) of each value (0 where None), through the feature's memo."""
        keys = values
        if not set(map(type, values)) <= _STR_OR_NONE:
            keys = [v if type(v) is str or v is None else (type(v), v) for v in values]  # 1 == 1.0 as keys; "n=1" != "n=1.0"
            # maybe an integer beyond 64 bits: digits lost
            counters["sparse_inexact_numbers"] += sum(type(v) is float and not -_INT64 < v < _INT64 for v in values)
        hashes = list(map(cache.get, keys))
        if None in hashes:
            missing = [i for i, h in enumerate(hashes) if h is None]
            if len(cache) + len(missing) > _FEATURE_MEMO:
                cache.clear()
                cache[None] = 0
            fresh = hash_ids([f"{full}={values[i]}" for i in missing]).tolist()
            for i, h in zip(missing, fresh):
                hashes[i] = cache[keys[i]] = h
        return hashes


def key_for_user(user: str | int) -> bytes:
    """The message key the contract asks for: the user_id's text, UTF-8; an integer in decimal."""
    return user.encode("utf-8", "surrogatepass") if type(user) is str else b"%d" % user


def _bad_id(value: str) -> bool:
    """Whitespace only, or a control character anywhere: a producer bug, never a real id
    (every blank id would merge into one user; NUL is where C producers cut strings)."""
    return value.isspace() or _CONTROL.search(value) is not None


def _repeated_name(raw: bytes, ev: dict[str, Any]) -> str | None:
    """A name the parsed event ``ev`` or one of its feature objects holds twice in ``raw``."""
    return repeated_name(raw, [ev, *(d for d in (ev.get(s) for s in _SCOPE_FIELDS) if type(d) is dict)])


def _object_array(items: list[bytes]) -> np.ndarray:
    out = np.empty(len(items), object)
    out[:] = items
    return out
