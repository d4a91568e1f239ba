"""Decode + validate: every message becomes exactly one event or one reasoned rejection."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumers.config import DecoderConfig
from consumers.decode import EventDecoder, key_for_user
from consumers.dlq import decode_original, dlq_record
from consumers.reasons import Reason, Rejection
from consumers.schema import Action, hash_feature, hash_id

SPARSE = ("user.segment", "item.category", "context.device")
DENSE = ("item.price",)
VALID: dict[str, Any] = {"event_id": "e1", "type": "exposure", "ts": 1_767_225_600_000, "user_id": "u1",
                         "item_id": 42, "request_id": "r1", "user_features": {"segment": "s1"},
                         "item_features": {"category": "c3", "price": 9.5}, "context": {"device": "ios"}}


def decoder(**overrides: Any) -> EventDecoder:
    return EventDecoder(DecoderConfig(**overrides), SPARSE, DENSE)


def decode_one(value: bytes | None) -> tuple[Any, list[Rejection]]:
    out = decoder().decode([value], [3], [17])
    return out.events, out.rejections


def test_valid_exposure_columns() -> None:
    events, rejections = decode_one(orjson.dumps(VALID))
    assert rejections == []
    assert events.ts.tolist() == [VALID["ts"]]
    assert events.etype.tolist() == [Action.EXPOSURE]
    assert events.eid.tolist() == [hash_id("e1")]
    assert events.user.tolist() == [hash_id("u1")]
    assert events.item.tolist() == [hash_id("42")]  # ints and strings hash alike
    assert events.sparse.tolist() == [[hash_feature("user.segment", "s1"), hash_feature("item.category", "c3"),
                                       hash_feature("context.device", "ios")]]
    assert events.dense.dtype == np.float32 and events.dense.tolist() == [[9.5]]
    assert (events.partition.tolist(), events.offset.tolist()) == ([3], [17])


def test_missing_features_are_zero_and_nan_and_degraded_dense_values_are_counted() -> None:
    no_features = {k: v for k, v in VALID.items() if not k.endswith("features") and k != "context"}
    string_price = {**VALID, "item_features": {"category": "c3", "price": "cheap"}}
    huge_price = {**VALID, "item_features": {"category": "c3", "price": 1e300}}
    out = decoder().decode([orjson.dumps(v) for v in (no_features, string_price, huge_price)], [0] * 3, [0, 1, 2])
    assert out.events.sparse[0].tolist() == [0, 0, 0]
    assert np.isnan(out.events.dense[:, 0]).all()
    assert out.counters == {"dense_type_mismatches": 1, "dense_out_of_range": 1, "sparse_inexact_numbers": 0}


def test_join_key_ties_click_to_exposure_and_separates_items() -> None:
    click = {k: VALID[k] for k in ("user_id", "item_id", "request_id")} | {"event_id": "c", "type": "click", "ts": VALID["ts"] + 5}
    other = {**click, "event_id": "c2", "item_id": 43}
    out = decoder().decode([orjson.dumps(VALID), orjson.dumps(click), orjson.dumps(other)], [0] * 3, [0, 1, 2])
    keys = out.events.key.tolist()
    assert keys[0] == keys[1] != keys[2]
    assert out.events.raw[1] == orjson.dumps(click)


def _without(field: str) -> dict[str, Any]:
    return {k: v for k, v in VALID.items() if k != field}


BAD = [
    (None, Reason.EMPTY),
    (b"", Reason.EMPTY),
    (b"x" * 70_000, Reason.OVERSIZED),
    (b"{not json", Reason.NOT_JSON),
    (b'{"ts": NaN}', Reason.NOT_JSON),
    (b"\xff\xfe\x00", Reason.NOT_JSON),
    (orjson.dumps([VALID]), Reason.NOT_OBJECT),
    (b"17", Reason.NOT_OBJECT),
    (b"null", Reason.NOT_OBJECT),
    (orjson.dumps(_without("event_id")), Reason.MISSING_FIELD),
    (orjson.dumps(_without("request_id")), Reason.MISSING_FIELD),
    (orjson.dumps({**VALID, "event_id": 5}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "event_id": ""}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "event_id": "x" * 129}), Reason.EVENT_ID_TOO_LONG),
    (orjson.dumps({**VALID, "type": "purchase"}), Reason.UNKNOWN_TYPE),
    (orjson.dumps({**VALID, "type": 1}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "ts": "1767225600000"}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "ts": 1.7e12}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "ts": True}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "ts": -5}), Reason.BAD_TS),
    (orjson.dumps({**VALID, "ts": 1_700_000_000}), Reason.BAD_TS),  # seconds, not ms
    (orjson.dumps({**VALID, "ts": 10**18}), Reason.BAD_TS),
    (orjson.dumps({**VALID, "user_id": {"nested": [1]}}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "user_id": None}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "item_id": False}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "request_id": 7}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "item_id": "i" * 300}), Reason.ID_TOO_LONG),
    (orjson.dumps({**VALID, "user_features": ["s1"]}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "context": {"device": {"os": "ios"}}}), Reason.BAD_TYPE),
    (orjson.dumps({**VALID, "item_features": {"price": None}}), Reason.BAD_TYPE),
]


@pytest.mark.parametrize(("value", "reason"), BAD, ids=[f"{r.value}-{i}" for i, (_, r) in enumerate(BAD)])
def test_contract_violations_get_their_reason(value: bytes | None, reason: Reason) -> None:
    events, rejections = decode_one(value)
    assert len(events) == 0
    assert [(r.reason, r.partition, r.offset, r.original) for r in rejections] == [(reason, 3, 17, value)]


def test_clock_skew_check_uses_the_injected_clock() -> None:
    now = VALID["ts"] - 60_000
    dec = EventDecoder(DecoderConfig(max_clock_skew_ms=1000), SPARSE, DENSE, clock=lambda: now)
    out = dec.decode([orjson.dumps(VALID), orjson.dumps({**VALID, "ts": now + 500})], [0, 0], [0, 1])
    assert [r.reason for r in out.rejections] == [Reason.BAD_TS]
    assert out.events.offset.tolist() == [1]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
mutated_events = st.builds(
    lambda overrides, drop: orjson.dumps({k: v for k, v in {**VALID, **overrides}.items() if k not in drop}),
    st.dictionaries(st.sampled_from(sorted(VALID)), json_values, max_size=3),
    st.sets(st.sampled_from(sorted(VALID)), max_size=2),
)
garbage = st.binary(max_size=200) | json_values.map(orjson.dumps) | mutated_events


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(garbage, min_size=1, max_size=30))
def test_fuzz_every_message_is_an_event_or_a_reasoned_rejection(values: list[bytes]) -> None:
    out = decoder().decode(values, [0] * len(values), list(range(len(values))))
    accepted = set(out.events.offset.tolist())
    rejected = [r.offset for r in out.rejections]
    assert sorted([*accepted, *rejected]) == list(range(len(values)))  # each exactly once
    assert all(isinstance(r.reason, Reason) and r.original == values[r.offset] for r in out.rejections)
    assert ((out.events.ts >= DecoderConfig().min_ts_ms) & (out.events.ts <= DecoderConfig().max_ts_ms)).all()
    assert (out.events.eid != 0).all() and (out.events.user != 0).all() and (out.events.item != 0).all()
    assert np.isfinite(out.events.dense[~np.isnan(out.events.dense)]).all()
    dec = decoder()  # the inline fast path accepts exactly what the reference check accepts
    for v in values:
        try:
            parsed = orjson.loads(v)
        except orjson.JSONDecodeError:
            continue
        if 0 < len(v) <= DecoderConfig().max_message_bytes:
            assert (dec.validate(parsed) is None) == (len(dec.decode([v], [0], [0]).events) == 1)


@pytest.mark.parametrize("original", [orjson.dumps(VALID), b"\xff\x00binary", b"t" * 100])
def test_dlq_record_keeps_the_original(original: bytes) -> None:
    record = orjson.loads(dlq_record(Rejection(Reason.NOT_JSON, "detail", original, 2, 9), "events", 64))
    assert {k: record[k] for k in ("reason", "detail", "topic", "partition", "offset")} == \
        {"reason": "not_json", "detail": "detail", "topic": "events", "partition": 2, "offset": 9}
    assert decode_original(record) == original[:64]
    assert record["original_bytes"] == len(original)
    assert record["original_truncated"] == (len(original) > 64)


# ---------------------------------------------------------------- fast path == validate()
# Messages are written pair by pair, so a name can repeat (a dict cannot hold that), be
# \u-escaped, and an integer can exceed 64 bits (orjson.dumps refuses those).
SCALAR_NAMES = ("event_id", "type", "ts", "user_id", "item_id", "request_id")
FEATURE_NAMES = {"user_features": ("segment",), "item_features": ("category", "price"), "context": ("device",)}
NAMES = frozenset(SCALAR_NAMES) | frozenset(FEATURE_NAMES)
ID_TEXT = (st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=10).filter(lambda s: not s.isspace())
           | st.sampled_from(["type", "price", "a:b", 'q"uote', "back\\slash", "ü", "u 1"]))
USER = ID_TEXT | st.integers(-(2**63), 2**64 - 1) | st.sampled_from(["u1", "u2", 7])  # repeats hit the id memo
BIG_INT = st.integers(2**64, 10**300) | st.integers(-(10**300), -(2**63) - 1)
DEFECTS = ("none", "duplicate", "bad_id", "missing_key", "key_mismatch", "big_int", "huge_number", "missing_field",
           "bad_type", "unknown_type", "bad_ts", "id_too_long", "nested_duplicate", "dense_string", "dense_overflow",
           "sparse_big_int")
DEGRADED = {"dense_string": "dense_type_mismatches", "dense_overflow": "dense_out_of_range",
            "sparse_big_int": "sparse_inexact_numbers"}


def json_name(name: str, escaped: bool) -> bytes:
    return b'"' + b"".join(b"\\u%04x" % ord(c) for c in name) + b'"' if escaped else orjson.dumps(name)


def json_object(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"{" + b",".join(name + b":" + value for name, value in pairs) + b"}"


@st.composite
def hostile_messages(draw: st.DrawFn) -> tuple[bytes, bytes | None, str, str]:
    """``(value, key, defect, expected reason or "")``: a valid event with at most one defect."""
    user = draw(USER)
    scalars = {"event_id": orjson.dumps(draw(ID_TEXT)), "type": orjson.dumps(draw(st.sampled_from(["exposure", "click", "convert"]))),
               "ts": b"%d" % draw(st.integers(DecoderConfig().min_ts_ms, DecoderConfig().max_ts_ms)),
               "user_id": orjson.dumps(user), "item_id": orjson.dumps(draw(USER)), "request_id": orjson.dumps(draw(ID_TEXT))}
    features = {"user_features": {"segment": orjson.dumps(draw(ID_TEXT | st.integers(0, 9)))},
                "item_features": {"category": orjson.dumps(draw(ID_TEXT)),
                                  "price": orjson.dumps(draw(st.floats(-1e30, 1e30) | st.integers(-5, 5)))},
                "context": {"device": orjson.dumps(draw(ID_TEXT))}}
    for scope in draw(st.sets(st.sampled_from(["user_features", "context"]))):
        del features[scope]  # optional objects (item_features stays: the degraded defects need it)
    extras = draw(st.dictionaries(st.text(max_size=6).filter(lambda n: n not in NAMES), json_values, max_size=2))
    key: bytes | None = key_for_user(user)
    defect = draw(st.sampled_from(DEFECTS))
    expected: str = ""
    nested: list[tuple[bytes, bytes]] = []
    if defect == "duplicate":
        scope = draw(st.sampled_from(["", *features]))
        target = scalars if not scope else {n: features[scope][n] for n in features[scope]}
        name = draw(st.sampled_from(sorted(target)))
        again = (json_name(name, draw(st.booleans())), draw(st.sampled_from([target[name], b'"other"', b"1"])))
        nested.append((scope, again))
        expected = Reason.DUPLICATE_FIELD.value
    elif defect == "bad_id":
        name = draw(st.sampled_from(["event_id", "user_id", "item_id", "request_id"]))
        base = draw(ID_TEXT)
        at = draw(st.integers(0, len(base)))
        bad = draw(st.text(" \u00a0\u2003\u3000", min_size=1, max_size=3)
                   | st.characters(categories=("Cc",)).map(lambda c: base[:at] + c + base[at:]))
        scalars[name] = orjson.dumps(bad)
        key = key_for_user(bad) if name == "user_id" else key
        expected = Reason.BAD_ID.value
    elif defect == "missing_key":
        key, expected = None, Reason.MISSING_KEY.value
    elif defect == "key_mismatch":
        key = draw(st.sampled_from([b"", b"0" + key, key + b"x", key.upper() + b"\xff"]))
        expected = Reason.KEY_MISMATCH.value
    elif defect == "big_int":
        scalars[draw(st.sampled_from(["ts", "user_id", "item_id"]))] = b"%d" % draw(BIG_INT)
        expected = Reason.BAD_TYPE.value
    elif defect == "huge_number":  # beyond double range: orjson cannot parse it, wherever it is
        scalars["ts"] = b"1" + b"0" * draw(st.integers(309, 400))
        expected = Reason.NOT_JSON.value
    elif defect == "missing_field":
        del scalars[draw(st.sampled_from(SCALAR_NAMES))]
        expected = Reason.MISSING_FIELD.value
    elif defect == "bad_type":
        name = draw(st.sampled_from(["event_id", "type", "ts", "user_id", "request_id"]))
        scalars[name] = draw(st.sampled_from([b"null", b"true", b"[]", b"{}", b"1.5", *[b'""'] * (name != "type")]))
        expected = Reason.BAD_TYPE.value
    elif defect == "unknown_type":
        scalars["type"], expected = b'"purchase"', Reason.UNKNOWN_TYPE.value
    elif defect == "bad_ts":
        scalars["ts"], expected = b"%d" % draw(st.sampled_from([-1, 0, 1_700_000_000, 10**18])), Reason.BAD_TS.value
    elif defect == "id_too_long":
        scalars["request_id"], expected = orjson.dumps("r" * 300), Reason.ID_TOO_LONG.value
    elif defect == "nested_duplicate":  # names are unique per object of the contract only: accepted
        extras = {**extras, "nested": None}
    elif defect == "dense_string":
        features["item_features"]["price"] = orjson.dumps(draw(st.sampled_from(["12.5", "cheap", "nan"])))
    elif defect == "dense_overflow":
        features["item_features"]["price"] = orjson.dumps(draw(st.floats(3.5e38, 1e308) | st.floats(-1e308, -3.5e38)))
    elif defect == "sparse_big_int":
        features["item_features"]["category"] = b"%d" % draw(BIG_INT)
    extra_pairs = [(orjson.dumps(n), b'{"a":1,"a":2}' if n == "nested" else orjson.dumps(v)) for n, v in extras.items()]
    pairs = [(orjson.dumps(n), v) for n, v in scalars.items()] + extra_pairs
    for scope, inner in features.items():
        inner_pairs = [(orjson.dumps(n), v) for n, v in inner.items()] + [p for s, p in nested if s == scope]
        pairs.append((orjson.dumps(scope), json_object(draw(st.permutations(inner_pairs)))))
    pairs = draw(st.permutations(pairs + [p for s, p in nested if s == ""]))
    return json_object(pairs), key, defect, expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile_messages(), min_size=1, max_size=16))
def test_fast_path_and_validate_agree_on_every_defect(messages: list[tuple[bytes, bytes | None, str, str]]) -> None:
    """One decode() call over the batch (so the id memo and the request memo are in play)
    gives every message the verdict and reason the generator meant, and that validate()
    gives the parsed message on its own."""
    values = [m[0] for m in messages]
    keys = [m[1] for m in messages]
    dec = decoder()
    out = dec.decode(values, [0] * len(values), list(range(len(values))), keys)
    verdict = {r.offset: r.reason.value for r in out.rejections} | dict.fromkeys(out.events.offset.tolist(), "")
    assert [verdict[i] for i in range(len(messages))] == [m[3] for m in messages]
    for value, key, _, expected in messages:
        if expected != Reason.NOT_JSON.value:
            problem = decoder().validate(orjson.loads(value), raw=value, key=key)
            assert (problem[0].value if problem else "") == expected
    exposures = [m for m in messages if not m[3] and orjson.loads(m[0])["type"] == "exposure"]
    assert out.counters == {name: sum(m[2] == defect for m in exposures) for defect, name in DEGRADED.items()}
