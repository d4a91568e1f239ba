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
from consumers.hashing import HashMemo, mix_ids
from consumers.reasons import Reason, Rejection
from consumers.schema import MAX_EVENT_ID_LEN, Action, EventBatch, hash_feature, hash_id

_TYPE_CODES = {"exposure": int(Action.EXPOSURE), "click": int(Action.CLICK), "convert": int(Action.CONVERT)}
_EXPOSURE = int(Action.EXPOSURE)
_REQUIRED = ("event_id", "type", "ts", "user_id", "item_id", "request_id")
_FEATURE_SCOPES = {"user": "user_features", "item": "item_features", "context": "context"}
_SCOPE_FIELDS = tuple(_FEATURE_SCOPES.values())
_SCALAR_TYPES = frozenset((str, int, float))
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

    The loop has a fast path for well-formed events; anything it does not accept goes
    through :meth:`validate`, the authoritative check that names the reason.
    """

    def __init__(self, config: DecoderConfig, sparse: Sequence[str], dense: Sequence[str],
                 clock: Callable[[], int] | None = None) -> None:
        self.config = config
        self._names = (tuple(sparse), tuple(dense))
        scope_index = {scope: i for i, scope in enumerate(_FEATURE_SCOPES)}
        self._sparse = [(scope_index[s], n, f"{s}.{n}", {}) for s, _, n in (f.partition(".") for f in sparse)]
        self._dense = [(scope_index[s], n) for s, _, n in (f.partition(".") for f in dense)]
        self._memo = HashMemo()
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
        min_ts, max_bytes, max_id = cfg.min_ts_ms, cfg.max_message_bytes, cfg.max_id_chars
        if not cfg.check_key:
            keys = None
        ts_l: list[int] = []
        type_l: list[int] = []
        eid_l: list[int] = []
        user_l: list[int] = []
        item_l: list[int] = []
        req_l: list[int] = []
        keep: list[int] = []  # index of each accepted message
        sparse_l: list[int] = []  # flat (n * S)
        dense_l: list[float] = []  # flat (n * D)
        rejections: list[Rejection] = []
        counters = dict.fromkeys(DECODE_COUNTERS, 0)
        memo = self._memo
        known = memo.ids  # user/item ids accepted before: their checks passed then
        id_of = known.get
        no_sparse = [0] * len(self._sparse)
        no_dense = [math.nan] * len(self._dense)
        request_memo: dict[str, int] = {}  # a request's items arrive together
        loads, type_codes, scalar = orjson.loads, _TYPE_CODES, _SCALAR_TYPES.__contains__
        for i, value in enumerate(values):
            if not value:
                rejections.append(Rejection(Reason.EMPTY, "null or empty message value", value, partitions[i], offsets[i]))
                continue
            if len(value) > max_bytes:
                rejections.append(Rejection(Reason.OVERSIZED, f"{len(value)} bytes > {max_bytes}", value,
                                            partitions[i], offsets[i]))
                continue
            try:
                ev = loads(value)
            except orjson.JSONDecodeError as exc:
                rejections.append(Rejection(Reason.NOT_JSON, str(exc)[:200], value, partitions[i], offsets[i]))
                continue
            if type(ev) is dict:  # fast path: every check of validate(), inline; anything unusual goes there
                get = ev.get
                eid, kind, ts = get("event_id"), get("type"), get("ts")
                user, item, request = get("user_id"), get("item_id"), get("request_id")
                scopes = uf, itf, cx = get("user_features"), get("item_features"), get("context")
                etype = type_codes.get(kind) if type(kind) is str else None
                # ids: isprintable() (no Cc) and not isspace() imply not _bad_id(); what they refuse (non-ASCII
                # spaces, format characters) validate() judges. Ids in the memos passed these checks before.
                fast = (etype is not None and type(eid) is str and 0 < len(eid) <= MAX_EVENT_ID_LEN
                        and eid.isprintable() and not eid.isspace()
                        and type(ts) is int and min_ts <= ts <= max_ts
                        and type(request) is str and (request in request_memo or (
                            0 < len(request) <= max_id and request.isprintable() and not request.isspace()))
                        and (type(user) is int or (type(user) is str and (user in known or (
                            0 < len(user) <= max_id and user.isprintable() and not user.isspace()))))
                        and (type(item) is int or (type(item) is str and (item in known or (
                            0 < len(item) <= max_id and item.isprintable() and not item.isspace()))))
                        and (uf is None or (type(uf) is dict and all(map(scalar, map(type, uf.values())))))
                        and (itf is None or (type(itf) is dict and all(map(scalar, map(type, itf.values())))))
                        and (cx is None or (type(cx) is dict and all(map(scalar, map(type, cx.values())))))
                        # the key rule; user.encode() == key_for_user(user): orjson strings are valid UTF-8
                        and (keys is None or keys[i] == (user.encode() if type(user) is str else b"%d" % user))
                        # one ':' per name outside strings: equal counts prove no name was repeated
                        and (value.count(b":") == len(ev) + (len(uf) if uf else 0) + (len(itf) if itf else 0)
                             + (len(cx) if cx else 0) or _repeated_name(value, ev) is None))
            else:
                fast = False
            if not fast:
                problem = self.validate(ev, max_ts, raw=value, key=UNKEYED if keys is None else keys[i])
                if problem is not None:
                    rejections.append(Rejection(problem[0], problem[1], value, partitions[i], offsets[i]))
                    continue
                eid, ts, user, item, request = ev["event_id"], ev["ts"], ev["user_id"], ev["item_id"], ev["request_id"]
                etype = type_codes[ev["type"]]
                scopes = ev.get("user_features"), ev.get("item_features"), ev.get("context")
            keep.append(i)
            ts_l.append(ts)
            type_l.append(etype)
            eid_l.append(hash_id(eid))
            h = id_of(user)
            user_l.append(memo.id(user) if h is None else h)
            h = id_of(item)
            item_l.append(memo.id(item) if h is None else h)
            h = request_memo.get(request)
            if h is None:
                h = request_memo[request] = hash_id(request)
            req_l.append(h)
            if etype == _EXPOSURE:
                self._features(scopes, sparse_l, dense_l, counters)
            else:
                sparse_l += no_sparse
                dense_l += no_dense
        events = self._columns(keep, values, partitions, offsets, ts_l, type_l, eid_l, user_l, item_l, req_l,
                               sparse_l, dense_l, counters)
        return Decoded(events, rejections, counters)

    def _columns(self, keep: list[int], values: Sequence[bytes | None], partitions: Sequence[int],
                 offsets: Sequence[int], ts: list[int], etype: list[int], eid: list[int], user: list[int],
                 item: list[int], request: list[int], sparse: list[int], dense: list[float],
                 counters: dict[str, int]) -> EventBatch:
        n = len(keep)
        item_arr = np.array(item, np.int64)
        with np.errstate(over="ignore"):
            dense_arr = np.array(dense, np.float32).reshape(n, len(self._dense))
        overflow = np.isinf(dense_arr)  # JSON has no inf literal: every inf is a float32 overflow
        if overflow.any():
            dense_arr[overflow] = np.nan  # beyond float32 range: as good as missing
            counters["dense_out_of_range"] += int(overflow.sum())
        return EventBatch(
            ts=np.array(ts, np.int64),
            etype=np.array(etype, np.int8),
            eid=np.array(eid, np.int64),
            user=np.array(user, np.int64),
            item=item_arr,
            key=mix_ids(np.array(request, np.int64), item_arr),
            partition=np.array([partitions[i] for i in keep], np.int32),
            offset=np.array([offsets[i] for i in keep], np.int64),
            sparse=np.array(sparse, np.int64).reshape(n, len(self._sparse)),
            dense=dense_arr,
            raw=_object_array([values[i] for i in keep]),
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

    def _features(self, scopes: tuple[dict[str, Any] | None, ...], sparse: list[int], dense: list[float],
                  counters: dict[str, int]) -> None:
        """Append one exposure's declared features (``scopes``: the validated user, item
        and context objects); count degraded values in ``counters``."""
        for scope, name, full, cache in self._sparse:
            feats = scopes[scope]
            value = feats.get(name) if feats else None
            if value is None:
                sparse.append(0)
                continue
            if type(value) is str:
                key = value
            else:
                key = (type(value), value)  # 1 == 1.0 as keys; "n=1" != "n=1.0"
                if type(value) is float and not -_INT64 < value < _INT64:  # maybe an integer beyond 64 bits: digits lost
                    counters["sparse_inexact_numbers"] += 1
            h = cache.get(key)
            if h is None:
                if len(cache) >= _FEATURE_MEMO:
                    cache.clear()
                h = cache[key] = hash_feature(full, value)
            sparse.append(h)
        for scope, name in self._dense:
            feats = scopes[scope]
            value = feats.get(name) if feats else None
            if type(value) is float or type(value) is int:
                dense.append(float(value))  # beyond float32 range: counted in _columns
            else:
                # A number sent as a string is a producer/config type mismatch, not parsed: float()
                # would also take "nan", "1_000" and " 12 ", a second contract nobody wrote down.
                counters["dense_type_mismatches"] += value is not None
                dense.append(math.nan)


def key_for_user(user: str | int) -> bytes:
    """The message key the contract asks for: the user_id's text, UTF-8; an integer in decimal."""
    return user.encode("utf-8", "surrogatepass") if type(user) is str else b"%d" % user


def _bad_id(value: str) -> bool:
    """Whitespace only, or a control character anywhere: a producer bug, never a real id
    (every blank id would merge into one user; NUL is where C producers cut strings)."""
    return value.isspace() or _CONTROL.search(value) is not None


def _repeated_name(raw: bytes, ev: dict[str, Any]) -> str | None:
    """A name that the event object, or one of its feature objects, holds twice in
    ``raw`` (``ev`` parsed, where the last one won): ``"name"`` or ``"scope.name"``; else
    None. Cheapest proof first."""
    objects = [ev, *(d for d in (ev.get(s) for s in _SCOPE_FIELDS) if type(d) is dict)]
    if raw.count(b":") == sum(map(len, objects)):
        return None  # outside strings each name has one ':' and nothing else has one: no name was folded
    if b"\\" not in raw:  # no escapes: every name is written verbatim, a repeated one twice
        if all(raw.count(b'"%s"' % name.encode()) < 2 for obj in objects for name in obj):
            return None
    return _scan_repeated(raw)


# A JSON string token, or a structural character that matters for names (',' does not).
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:]')


def _scan_repeated(raw: bytes) -> str | None:
    """The exact check behind :func:`_repeated_name`: walk the tokens of ``raw`` (valid
    JSON: orjson parsed it) without recursion, collecting the names of the top-level
    object and of the feature objects directly under it."""
    stack: list[set[str] | None] = []  # per open container: names seen, None where untracked
    field = ""  # the top-level name whose value is being read
    string = b""  # the last string token: a name when a ':' follows
    for match in _TOKENS.finditer(raw):
        token = match.group()
        if token == b":":
            name = orjson.loads(string)
            if len(stack) == 1:
                field = name
            names = stack[-1]
            if names is not None:
                if name in names:
                    return name if len(stack) == 1 else f"{field}.{name}"
                names.add(name)
        elif token == b"{":
            stack.append(set() if not stack or (len(stack) == 1 and field in _SCOPE_FIELDS) else None)
        elif token == b"[":
            stack.append(None)
        elif token in (b"}", b"]"):
            stack.pop()
        else:
            string = token
    return None


def _object_array(items: list[bytes]) -> np.ndarray:
    out = np.empty(len(items), object)
    out[:] = items
    return out
