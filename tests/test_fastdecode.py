"""The native fast path (msgspec) against the authoritative validator: same verdict,
same reason, same event, on every generated message."""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.config import DecoderConfig
from consumers.decode import EventDecoder, key_for_user
from consumers.fastdecode import ROW_FIELDS, FastDecoder
from consumers.hashing import hash_ids
from consumers.schema import hash_feature, hash_id
from tests.test_decode import DENSE, SPARSE, VALID, garbage, hostile_messages

CONFIG = DecoderConfig(max_id_chars=40)  # small, so the length bound is hit by generated ids


def authoritative(value: bytes, key: bytes | None) -> tuple[str, Any]:
    """The reference verdict of one message on its own: ("", parsed event) or (reason, None)."""
    dec = EventDecoder(CONFIG, SPARSE, DENSE)
    if not value:
        return "empty", None
    if len(value) > CONFIG.max_message_bytes:
        return "oversized", None
    try:
        ev = orjson.loads(value)
    except orjson.JSONDecodeError:
        return "not_json", None
    problem = dec.validate(ev, raw=value, key=key)
    return (problem[0].value, None) if problem else ("", ev)


# Spaces, escapes, non-ASCII and colons inside strings: what the fast path's screens look at.
ODD_TEXT = st.sampled_from([" ", "  ", " a", "a ", "\u00a0", "\u2003", "é", "a:b", "\x7f", "\x85", "\t", "\\", '"',
                            "\u200b", "\ufeff", "x" * 41, ""]) | st.text(max_size=6)
odd_events = st.builds(
    lambda overrides, drop: orjson.dumps({k: v for k, v in {**VALID, **overrides}.items() if k not in drop}),
    st.dictionaries(st.sampled_from(["event_id", "user_id", "item_id", "request_id"]), ODD_TEXT, max_size=2)
    | st.dictionaries(st.sampled_from(["user_features", "item_features", "context"]),
                      st.none() | st.dictionaries(ODD_TEXT, ODD_TEXT | st.integers(-(2**65), 2**65) | st.floats(),
                                                  max_size=3), max_size=2),
    st.sets(st.sampled_from(["user_features", "item_features", "context"]), max_size=3),
)
keyed = (hostile_messages().map(lambda m: (m[0], m[1]))
         | st.tuples(garbage | odd_events, st.none() | st.just(b"u1") | st.binary(max_size=4)))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(keyed, min_size=1, max_size=12))
def test_fast_path_and_validator_agree(messages: list[tuple[bytes, bytes | None]]) -> None:
    """Over one batch: the fast path only vouches for messages the validator accepts, and
    reads them as orjson does; the decoder gives each message the validator's verdict."""
    values = [m[0] for m in messages]
    keys = [m[1] for m in messages]
    reference = [authoritative(v, k) for v, k in messages]
    sized = [i for i, v in enumerate(values) if v and len(v) <= CONFIG.max_message_bytes]
    columns, ok = FastDecoder(CONFIG.min_ts_ms, CONFIG.max_ts_ms, CONFIG.max_id_chars).columns(
        [values[i] for i in sized], CONFIG.max_ts_ms, [keys[i] for i in sized])
    for j, i in enumerate(sized):
        if ok[j]:
            reason, ev = reference[i]
            assert reason == "", (values[i], reason)
            fast = [None if column[j] is msgspec.UNSET else column[j] for column in columns]
            slow = [ev.get(name) for name in ROW_FIELDS]
            assert fast == slow and list(map(type, fast)) == list(map(type, slow))
    out = EventDecoder(CONFIG, SPARSE, DENSE).decode(values, [0] * len(values), list(range(len(values))), keys)
    verdict = {r.offset: r.reason.value for r in out.rejections} | dict.fromkeys(out.events.offset.tolist(), "")
    assert [verdict[i] for i in range(len(values))] == [r[0] for r in reference]


@given(st.lists(st.text(max_size=12) | st.integers(-(2**63), 2**64 - 1), max_size=20))
def test_hash_ids_is_hash_id(values: list[str | int]) -> None:
    assert hash_ids(values).tolist() == [hash_id(v) for v in values]


def test_columns_match_the_scalar_hashes() -> None:
    """Ids, keys and features of a mixed batch equal the per-event reference hashes."""
    events = [{**VALID, "event_id": f"e{i}", "user_id": f"u{i % 3}", "item_id": i % 4, "request_id": f"r{i // 2}",
               "type": "click" if i % 5 == 4 else "exposure", "user_features": {"segment": [i, float(i), "s"][i % 3]}}
              for i in range(12)]
    values = [orjson.dumps(e) for e in events]
    out = EventDecoder(CONFIG, SPARSE, DENSE).decode(values, [1] * 12, list(range(12)),
                                                     [key_for_user(e["user_id"]) for e in events])
    assert out.events.eid.tolist() == [hash_id(e["event_id"]) for e in events]
    assert out.events.user.tolist() == [hash_id(e["user_id"]) for e in events]
    assert out.events.item.tolist() == [hash_id(e["item_id"]) for e in events]
    segments = [hash_feature("user.segment", e["user_features"]["segment"]) if e["type"] == "exposure" else 0
                for e in events]
    assert out.events.sparse[:, 0].tolist() == segments
    assert len(set(segments[:3])) == 3  # 0, 0.0 and "s" stay three values
    assert np.isnan(out.events.dense[[e["type"] != "exposure" for e in events]]).all()
