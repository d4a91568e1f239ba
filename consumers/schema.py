"""The event contract (input) and the sample contract (joiner -> trainer).

This module is the single source of truth for both shapes (../shared/DESIGN.md §3-4).
Decoded events travel as an :class:`EventBatch` (one numpy column per field). A *sample batch* is a plain ``dict[str, numpy.ndarray]``, batch-first, one array per
field listed in :data:`SAMPLE_FIELDS`. The trainer turns it into tensors with
``torch.from_numpy`` (zero copy); Arrow IPC on the ``samples`` topic uses the same names.

Conventions every part relies on:

* Ids are int64 and **0 means "empty"** (padding, empty rank-package slot, missing
  sparse feature). :func:`hash_id` never returns 0.
* History is right-aligned: the most recent event sits at index ``L-1``; the
  ``L - hist_len`` leading slots are padding (item 0, action 0, ts 0).
  Every history event has ``ts < sample ts`` strictly (no label leakage).
* Samples leave the joiner in the order ``(emit_ms, ts, sample_id, is_correction)``;
  ``emit_ms`` is what lets several joiners' outputs be merged into that one order.
* Labels are float32 0/1. ``convert`` is 1 only if ``click`` is 1.
  ``is_correction`` marks an ``emit_then_correct`` correction sample: the same exposure
  re-emitted with ``convert=1`` after it was first emitted with ``convert=0``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from enum import IntEnum
from typing import Any, Final, Mapping

import numpy as np

from consumers.state import pack_bytes, unpack_bytes

EVENT_TYPES: Final = ("exposure", "click", "convert")
MAX_EVENT_ID_LEN: Final = 128


class Action(IntEnum):
    """Action codes used in history sequences (0 is padding)."""

    PAD = 0
    EXPOSURE = 1
    CLICK = 2
    CONVERT = 3


class Slot(IntEnum):
    """Column index of each rank-package slot in ``rank_package`` (B, 5)."""

    COLD_CLICK = 0
    HOT_CLICK = 1
    COLD_EXPOSURE = 2
    HOT_EXPOSURE = 3
    RANDOM = 4


RANK_PACKAGE_SLOTS: Final = len(Slot)

_INT64_MASK: Final = (1 << 63) - 1


def hash_id(value: str | int) -> int:
    """Map a user/item/feature value to a stable, positive, non-zero int64.

    Strings and integers hash through their decimal/text form, so ``123`` and ``"123"``
    are the same id (producers disagree on id types; the contract allows both).
    blake2b is stable across processes and Python versions, unlike ``hash()``.
    """
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    h = int.from_bytes(digest, "little") & _INT64_MASK
    return h or 1


def hash_feature(name: str, value: str | int | float) -> int:
    """Hash a sparse feature value, namespaced by feature name so values never collide
    across features that share one embedding table."""
    return hash_id(f"{name}={value}")


@dataclass(slots=True)
class EventBatch:
    """Valid events, one row each, in message order. ``etype`` holds :class:`Action`
    codes; ``key`` joins clicks/conversions to their exposure (request_id x item);
    ``raw`` keeps the original bytes for DLQ records that the joiner may write later."""

    ts: np.ndarray  # (n,) int64 ms
    etype: np.ndarray  # (n,) int8
    eid: np.ndarray  # (n,) int64 hash_id(event_id); the sample_id of an exposure
    user: np.ndarray  # (n,) int64
    item: np.ndarray  # (n,) int64
    key: np.ndarray  # (n,) int64
    partition: np.ndarray  # (n,) int32
    offset: np.ndarray  # (n,) int64
    sparse: np.ndarray  # (n, S) int64, 0 = missing (always 0 on clicks/conversions)
    dense: np.ndarray  # (n, D) float32, NaN = missing
    raw: np.ndarray  # (n,) object: bytes, or None where no DLQ record can follow

    def __len__(self) -> int:
        return len(self.ts)

    def take(self, index: np.ndarray | slice) -> "EventBatch":
        """Rows ``index`` (int index, bool mask or slice) of every column."""
        return EventBatch(*[getattr(self, name)[index] for name in _EVENT_COLUMNS])

    @staticmethod
    def concat(batches: Sequence["EventBatch"]) -> "EventBatch":
        return EventBatch(*[np.concatenate([getattr(b, name) for b in batches]) for name in _EVENT_COLUMNS])

    @staticmethod
    def empty(num_sparse: int, num_dense: int) -> "EventBatch":
        i64 = np.zeros(0, np.int64)
        return EventBatch(i64, np.zeros(0, np.int8), i64, i64, i64, i64, np.zeros(0, np.int32), i64,
                          np.zeros((0, num_sparse), np.int64), np.zeros((0, num_dense), np.float32),
                          np.zeros(0, object))

    def state_dict(self) -> dict[str, Any]:
        """Copies of the numeric columns plus ``raw`` packed into one byte buffer (no pickle)."""
        state: dict[str, Any] = {name: getattr(self, name).copy() for name in _NUMERIC_COLUMNS}
        state["raw"] = pack_bytes(self.raw.tolist())
        return state

    @staticmethod
    def from_state(state: Mapping[str, Any], num_sparse: int, num_dense: int) -> "EventBatch":
        """Inverse of :meth:`state_dict`; ``num_sparse``/``num_dense`` restore the 2-D
        feature columns when a store flattened an empty one."""
        raw = np.empty(len(state["ts"]), object)
        raw[:] = unpack_bytes(state["raw"])
        columns = {name: np.asarray(state[name], _EVENT_DTYPES[name]) for name in _NUMERIC_COLUMNS}
        columns["sparse"] = columns["sparse"].reshape(-1, num_sparse)
        columns["dense"] = columns["dense"].reshape(-1, num_dense)
        return EventBatch(**columns, raw=raw)


_EVENT_COLUMNS: Final = tuple(f.name for f in fields(EventBatch))
_NUMERIC_COLUMNS: Final = tuple(name for name in _EVENT_COLUMNS if name != "raw")
_EVENT_DTYPES: Final = {"ts": np.int64, "etype": np.int8, "eid": np.int64, "user": np.int64, "item": np.int64,
                        "key": np.int64, "partition": np.int32, "offset": np.int64, "sparse": np.int64,
                        "dense": np.float32}


@dataclass(frozen=True)
class FieldSpec:
    """One column of a sample batch. ``shape`` uses symbolic dims after the batch dim:
    ``L`` history length, ``K`` extra negatives, ``S`` sparse features, ``D`` dense
    features, ``P`` rank-package slots (5)."""

    dtype: np.dtype
    shape: tuple[str, ...]
    doc: str


SAMPLE_FIELDS: Final[Mapping[str, FieldSpec]] = {
    "sample_id": FieldSpec(np.dtype(np.int64), (), "hash of the exposure's event_id"),
    "user": FieldSpec(np.dtype(np.int64), (), "hash_id(user_id)"),
    "item": FieldSpec(np.dtype(np.int64), (), "hash_id(item_id) of the exposed item"),
    "ts": FieldSpec(np.dtype(np.int64), (), "exposure event time, ms since epoch"),
    "click": FieldSpec(np.dtype(np.float32), (), "1 if clicked within click_window"),
    "convert": FieldSpec(np.dtype(np.float32), (), "1 if converted after a click within convert_window"),
    "is_correction": FieldSpec(np.dtype(np.bool_), (), "emit_then_correct correction sample"),
    "hour": FieldSpec(np.dtype(np.int64), (), "0..23, UTC"),
    "weekday": FieldSpec(np.dtype(np.int64), (), "0..6, Monday=0"),
    "week": FieldSpec(np.dtype(np.int64), (), "ISO week of year, 1..53"),
    "gap_bucket": FieldSpec(np.dtype(np.int64), (), "log bucket of ms since the user's previous event; 0 = no previous event"),
    "hist_len": FieldSpec(np.dtype(np.int64), (), "number of real history events, 0..L"),
    "hist_items": FieldSpec(np.dtype(np.int64), ("L",), "history item ids, right-aligned, 0-padded"),
    "hist_actions": FieldSpec(np.dtype(np.int64), ("L",), "Action codes, 0-padded"),
    "hist_ts": FieldSpec(np.dtype(np.int64), ("L",), "history event times (ms), 0-padded, all < ts"),
    "hist_gap_buckets": FieldSpec(np.dtype(np.int64), ("L",), "log bucket of (ts - hist_ts); 0 on padding"),
    "rank_package": FieldSpec(np.dtype(np.int64), ("P",), "Slot-ordered negatives from the history prefix; 0 = empty"),
    "neg_items": FieldSpec(np.dtype(np.int64), ("K",), "random negatives from the item pool, never == item"),
    "sparse": FieldSpec(np.dtype(np.int64), ("S",), "declared sparse features, hash_feature(name, value); 0 = missing"),
    "dense": FieldSpec(np.dtype(np.float32), ("D",), "declared dense features; NaN = missing"),
    "user_ctr_prior": FieldSpec(np.dtype(np.float32), (), "smoothed user CTR prior"),
    "item_ctr_prior": FieldSpec(np.dtype(np.float32), (), "smoothed item CTR prior (global popularity stats)"),
    "partition": FieldSpec(np.dtype(np.int32), (), "Kafka partition of the exposure (ledger / debugging)"),
    "offset": FieldSpec(np.dtype(np.int64), (), "Kafka offset of the exposure (ledger / debugging)"),
    "emit_ms": FieldSpec(np.dtype(np.int64), (), "event time the joiner released the sample at (window close, "
                         "conversion ts of a correction): the first key of the emission order"),
}

# Set by the joiner when a sample leaves, not stored with pending samples.
EMISSION_FIELDS: Final = ("emit_ms",)

SampleBatch = dict[str, np.ndarray]


def validate_batch(batch: Mapping[str, np.ndarray]) -> int:
    """Check a sample batch against :data:`SAMPLE_FIELDS`; return its size B.

    Raises ``ValueError`` naming every problem (missing/extra field, dtype, rank,
    inconsistent batch or symbolic dims).
    """
    problems: list[str] = []
    missing = sorted(set(SAMPLE_FIELDS) - set(batch))
    extra = sorted(set(batch) - set(SAMPLE_FIELDS))
    if missing:
        problems.append(f"missing fields: {missing}")
    if extra:
        problems.append(f"unknown fields: {extra}")
    sizes: dict[str, int] = {}
    for name, spec in SAMPLE_FIELDS.items():
        if name not in batch:
            continue
        arr = batch[name]
        if arr.dtype != spec.dtype:
            problems.append(f"{name}: dtype {arr.dtype}, expected {spec.dtype}")
        if arr.ndim != 1 + len(spec.shape):
            problems.append(f"{name}: rank {arr.ndim}, expected {1 + len(spec.shape)}")
            continue
        for dim_name, size in zip(("B", *spec.shape), arr.shape):
            if sizes.setdefault(dim_name, size) != size:
                problems.append(f"{name}: dim {dim_name}={size}, other fields have {sizes[dim_name]}")
    if sizes.get("P", RANK_PACKAGE_SLOTS) != RANK_PACKAGE_SLOTS:
        problems.append(f"rank_package has {sizes['P']} slots, expected {RANK_PACKAGE_SLOTS}")
    if problems:
        raise ValueError("invalid sample batch: " + "; ".join(problems))
    return sizes.get("B", 0)


def empty_batch(history_len: int, negatives: int, sparse: int, dense: int) -> SampleBatch:
    """A zero-row batch with the right shapes (useful as a concat identity)."""
    dims = {"L": history_len, "K": negatives, "S": sparse, "D": dense, "P": RANK_PACKAGE_SLOTS}
    return {
        name: np.zeros((0, *(dims[d] for d in spec.shape)), dtype=spec.dtype)
        for name, spec in SAMPLE_FIELDS.items()
    }


def concat_batches(batches: list[SampleBatch]) -> SampleBatch:
    """Concatenate batches field by field (all must share L/K/S/D)."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    return {name: np.concatenate([b[name] for b in batches]) for name in SAMPLE_FIELDS}


def slice_batch(batch: Mapping[str, np.ndarray], start: int, stop: int) -> SampleBatch:
    """Rows ``[start, stop)`` of every field (views, no copy)."""
    return {name: arr[start:stop] for name, arr in batch.items()}
