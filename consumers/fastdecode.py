"""The decoder's native fast path: typed msgspec decoding plus batch-wide screens.

msgspec parses and type-checks an event in C against a typed ``Struct`` built from the
decoder config (event type, id lengths, ts bounds, feature value types), so a well-formed
event costs about what ``orjson.loads`` alone costs. What the types cannot say is checked
over the whole batch at once: control characters and blank ids (one regex over the joined
batch finds the few messages that need a per-id look), repeated names (one ``:`` per name),
the clock bound on ts and the key rule.

The fast path only ever *accepts*: anything it does not vouch for comes back as ``None``
and goes to :meth:`consumers.decode.EventDecoder.validate`, the authoritative check that
names the reason. So a reason never depends on which path saw a message, and an accepted
event is field for field what ``orjson.loads`` would have given (tests/test_fastdecode.py
checks both over generated messages).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence
from itertools import repeat
from typing import Annotated, Any, Final, Literal, Union

import msgspec
import numpy as np

from consumers.repeats import SCOPE_FIELDS, repeated_name
from consumers.schema import MAX_EVENT_ID_LEN

# One decoded event: the fields in this order, optional feature objects None when absent.
REQUIRED: Final = ("event_id", "type", "ts", "user_id", "item_id", "request_id")
ROW_FIELDS: Final = (*REQUIRED, *SCOPE_FIELDS)
Row = tuple[Any, ...]

# orjson gives an int within [-2^63, 2^64) and a float beyond (a bad_type id, a float feature);
# msgspec would give an int. The fast path takes int64 (msgspec bounds stop there) and
# leaves the rest to the slow path, so it never reads a number differently.
_JSON_INT = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# Backslash: escapes (control characters, surrogates) are judged by orjson + validate().
# DEL, non-ASCII and a leading space may hide a blank or control-character id: exact check.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _event_struct(min_ts: int, max_ts: int, max_id: int) -> type[msgspec.Struct]:
    """The contract's types and bounds as a Struct; unknown top-level names are refused
    (so every name in the object is a field here, which the duplicate check relies on)."""
    id_text = Annotated[str, msgspec.Meta(min_length=1, max_length=max_id)]
    scope = Union[dict[str, Union[str, _JSON_INT, float]], None, msgspec.UnsetType]
    return msgspec.defstruct(
        "FastEvent",
        [("event_id", Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_EVENT_ID_LEN)]),
         ("type", Literal["exposure", "click", "convert"]),
         ("ts", Annotated[int, msgspec.Meta(ge=min_ts, le=max_ts)]),
         ("user_id", Union[id_text, _JSON_INT]),
         ("item_id", Union[id_text, _JSON_INT]),
         ("request_id", id_text),
         *((name, scope, msgspec.UNSET) for name in SCOPE_FIELDS)],
        forbid_unknown_fields=True, gc=False,
    )


class FastDecoder:
    """Decode a batch of non-empty message values of at most ``max_message_bytes``."""

    def __init__(self, min_ts: int, max_ts: int, max_id: int) -> None:
        self._decode = msgspec.json.Decoder(_event_struct(min_ts, max_ts, max_id)).decode
        self._fields = [operator.attrgetter(name) for name in ROW_FIELDS]
        self._max_ts = max_ts

    def columns(self, values: Sequence[bytes], max_ts: int,
                keys: Sequence[bytes | None] | None) -> tuple[list[list[Any]], np.ndarray]:
        """The events' fields, one list per :data:`ROW_FIELDS` entry (an absent feature
        object is ``msgspec.UNSET``, falsy like the slow path's None), and a mask of the
        messages it vouches for; the others' entries are placeholders for the slow path to
        decide and overwrite. ``max_ts``: the ts bound of this call (the clock may lower
        it); ``keys``: the message keys for the key rule, or None."""
        n = len(values)
        ok = np.ones(n, bool)
        try:
            events = list(map(self._decode, values))
        except (msgspec.DecodeError, msgspec.ValidationError):  # rare: redo one by one
            events = [self._try(v) for v in values]
            ok[[i for i, e in enumerate(events) if e is _PLACEHOLDER]] = False
        columns = [list(map(field, events)) for field in self._fields]
        names = np.full(n, len(REQUIRED), np.int64)  # names in each message, for the duplicate check
        for scope in columns[6:]:
            names += np.fromiter([0 if d is msgspec.UNSET else 1 + len(d) if d else 1 for d in scope], np.int64, n)
        if max_ts < self._max_ts:
            ok &= np.array(columns[2], np.int64) <= max_ts
        # Outside strings each name has exactly one ':', and no other ':' is there: equal
        # counts prove no name was repeated (parsing keeps the last). Otherwise look closer.
        colons = np.fromiter(map(bytes.count, values, repeat(b":")), np.int64, n)
        for i in np.flatnonzero(ok & (colons != names)).tolist():
            ok[i] = not _repeats(values[i], events[i])
        for i in _suspects(values):
            ok[i] &= b"\\" not in values[i] and not _has_bad_id([column[i] for column in columns])
        if keys is not None:
            ok &= np.fromiter(map(operator.eq, _keys_for(columns[3]), keys), bool, n)
        return columns, ok

    def _try(self, value: bytes) -> Any:
        try:
            return self._decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return _PLACEHOLDER


class _Placeholder(msgspec.Struct, gc=False):
    """Stands in for a message the slow path decides."""

    event_id: str = ""
    type: str = "exposure"
    ts: int = 0
    user_id: str = ""
    item_id: str = ""
    request_id: str = ""
    user_features: None = None
    item_features: None = None
    context: None = None


_PLACEHOLDER: Final = _Placeholder()


def _suspects(values: Sequence[bytes]) -> list[int]:
    """Indices of the messages that hold a backslash, a DEL or non-ASCII byte, or a
    string that starts with a space (so maybe all spaces). Byte searches over the joined
    batch first: almost always they prove there is none."""
    joined = b"".join(values)
    if joined.isascii() and b"\\" not in joined and b"\x7f" not in joined and b'" ' not in joined:
        return []
    return [i for i, v in enumerate(values) if not v.isascii() or b"\\" in v or b"\x7f" in v or b'" ' in v]


def _has_bad_id(row: Row) -> bool:
    """The exact id rule of validate(): whitespace only, or a control character."""
    return any(type(v) is str and (v.isspace() or _CONTROL.search(v) is not None)
               for v in (row[0], row[3], row[4], row[5]))


def _repeats(raw: bytes, event: Any) -> bool:
    scopes = [getattr(event, name) for name in SCOPE_FIELDS]
    present = [name for name, d in zip(SCOPE_FIELDS, scopes) if d is not msgspec.UNSET]
    return repeated_name(raw, [[*REQUIRED, *present], *(d for d in scopes if d)]) is not None


def _keys_for(users: list[str | int]) -> list[bytes]:
    """The keys the contract asks for (msgspec strings are valid UTF-8: no surrogates)."""
    if all(type(u) is str for u in users):
        return list(map(str.encode, users))
    return [u.encode() if type(u) is str else b"%d" % u for u in users]
