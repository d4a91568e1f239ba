"""Names a JSON object holds twice: parsers keep the last, the contract refuses them.

Shared by the decoder's fast path and its authoritative validator, so both see a
repeated name alike.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

import orjson

SCOPE_FIELDS = ("user_features", "item_features", "context")


def repeated_name(raw: bytes, objects: Sequence[Collection[str]]) -> str | None:
    """A name that the event object, or one of its feature objects, holds twice in
    ``raw``: ``"name"`` or ``"scope.name"``; else None. ``objects``: the names parsing
    kept, of the event object first, then of each feature object it holds. Cheapest
    proof first."""
    if raw.count(b":") == sum(map(len, objects)):
        return None  # outside strings each name has one ':' and nothing else has one: no name was folded
    if b"\\" not in raw:  # no escapes: every name is written verbatim, a repeated one twice
        if all(raw.count(b'"%s"' % name.encode()) < 2 for obj in objects for name in obj):
            return None
    return _scan_repeated(raw)


# A JSON string token, or a structural character that matters for names (',' does not).
_TOKENS = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:]')


def _scan_repeated(raw: bytes) -> str | None:
    """The exact check behind :func:`repeated_name`: walk the tokens of ``raw`` (valid
    JSON: it was parsed) without recursion, collecting the names of the top-level
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
            stack.append(set() if not stack or (len(stack) == 1 and field in SCOPE_FIELDS) else None)
        elif token == b"[":
            stack.append(None)
        elif token in (b"}", b"]"):
            stack.pop()
        else:
            string = token
    return None
