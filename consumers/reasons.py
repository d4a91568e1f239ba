"""Why an event was rejected: stable, machine-readable reason strings.

The values are part of the DLQ record contract and of the metric labels
(``streamtrain_dlq_events_total{reason=...}``): never rename one, only add.
``docs/events.md`` explains each one to users.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Reason(str, Enum):
    # decode + validate (per message, pure)
    EMPTY = "empty"  # null or zero-length value (tombstone)
    OVERSIZED = "oversized"  # value longer than decoder.max_message_bytes
    NOT_JSON = "not_json"  # not parseable as JSON: includes NaN/Infinity literals and numbers beyond double range (~1.8e308)
    NOT_OBJECT = "not_object"  # JSON, but not an object
    MISSING_FIELD = "missing_field"  # a required field is absent
    # a field has the wrong JSON type (or is empty). Integers beyond 64 bits parse as doubles,
    # so ts / user_id / item_id beyond 64 bits are bad_type too (beyond ~1.8e308: not_json).
    BAD_TYPE = "bad_type"
    UNKNOWN_TYPE = "unknown_type"  # "type" is not exposure/click/convert
    BAD_TS = "bad_ts"  # ts outside [min_ts_ms, max_ts_ms] or beyond the allowed clock skew
    EVENT_ID_TOO_LONG = "event_id_too_long"  # event_id over 128 chars (DESIGN §3)
    ID_TOO_LONG = "id_too_long"  # user_id/item_id/request_id over decoder.max_id_chars
    DUPLICATE_FIELD = "duplicate_field"  # the event object or a feature object names a field twice
    BAD_ID = "bad_id"  # an id string is whitespace only or holds a control character (U+0000-001F, U+007F-009F)
    # key rule (decoder.check_key): the message key must be the user_id's text, UTF-8 (ints in decimal)
    MISSING_KEY = "missing_key"  # the message key is null
    KEY_MISMATCH = "key_mismatch"  # the message key is not the user_id
    # joiner (event time)
    TOO_LATE = "too_late"  # ts below the watermark: its windows may already be closed
    # "Open" = the exposure was seen and its windows had not closed at the event's ts (in
    # event time, so the reason never depends on when a sample was physically emitted).
    ORPHAN_CLICK = "orphan_click"  # no open exposure with this (request_id, item_id): none, or closed
    ORPHAN_CONVERT = "orphan_convert"  # no open exposure with this (request_id, item_id): none, or closed
    CLICK_OUTSIDE_WINDOW = "click_outside_window"  # open exposure, but a repeat click after click_window
    CONVERT_WITHOUT_CLICK = "convert_without_click"  # open exposure, but no click at or before the conversion
    CONVERT_OUTSIDE_WINDOW = "convert_outside_window"  # open exposure (still in its click window), conversion after click + convert_window
    TS_AHEAD = "ts_ahead"  # held as more than max_future_ms ahead of its partition's event time; later events never confirmed it
    DUPLICATE_EVENT_ID = "duplicate_event_id"  # event_id already finalised from another partition (ids are unique per topic)
    LABEL_USER_MISMATCH = "label_user_mismatch"  # (request_id, item_id) matches an open exposure, but of another user_id
    DUPLICATE_EXPOSURE = "duplicate_exposure"  # same request_id x item_id x user_id as an earlier exposure: a re-send


@dataclass(frozen=True, slots=True)
class Rejection:
    """One rejected message, on its way to the DLQ."""

    reason: Reason
    detail: str
    original: bytes | None
    partition: int
    offset: int
