"""Helpers that keep consumer state pickle-free: JSON-able trees plus numpy arrays.

``state_dict()`` of every consumer component returns a nested dict whose leaves are numpy
arrays (numeric or bool dtypes only) or JSON primitives. :func:`flatten_state` splits
such a tree into a JSON document and a flat ``{path: array}`` dict that safetensors or
``np.savez`` can store; :func:`unflatten_state` puts it back together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_ARRAY_REF = "__array__"


def flatten_state(tree: Mapping[str, Any], prefix: str = "") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(JSON tree with array references, {dotted path: array})."""
    doc: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or "." in key:
            raise ValueError(f"state keys must be strings without dots, got {key!r}")
        path = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            if value.dtype == object:
                raise ValueError(f"{path}: object arrays cannot be stored without pickle")
            arrays[path] = value
            doc[key] = {_ARRAY_REF: path}
        elif isinstance(value, Mapping):
            doc[key], sub = flatten_state(value, f"{path}.")
            arrays.update(sub)
        else:
            doc[key] = value
    return doc, arrays


def unflatten_state(doc: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, Mapping) and set(value) == {_ARRAY_REF}:
            out[key] = np.asarray(arrays[value[_ARRAY_REF]])
        elif isinstance(value, Mapping):
            out[key] = unflatten_state(value, arrays)
        else:
            out[key] = value
    return out


def pack_bytes(values: Sequence[bytes | None]) -> dict[str, np.ndarray]:
    """Variable-length byte strings (or None) as one uint8 buffer plus lengths (-1 = None)."""
    lengths = np.array([-1 if v is None else len(v) for v in values], np.int64)
    data = np.frombuffer(b"".join(v for v in values if v is not None), np.uint8).copy()
    return {"data": data, "lengths": lengths}


def unpack_bytes(packed: Mapping[str, np.ndarray]) -> list[bytes | None]:
    data = np.asarray(packed["data"], np.uint8).tobytes()
    out: list[bytes | None] = []
    pos = 0
    for length in np.asarray(packed["lengths"]).tolist():
        if length < 0:
            out.append(None)
        else:
            out.append(data[pos:pos + length])
            pos += length
    return out


def states_equal(a: Any, b: Any) -> bool:
    """Deep equality of two state trees (arrays by dtype, shape and value; NaN == NaN)."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a_arr, b_arr = np.asarray(a), np.asarray(b)
        if a_arr.dtype != b_arr.dtype or a_arr.shape != b_arr.shape:
            return False
        return bool(np.array_equal(a_arr, b_arr, equal_nan=a_arr.dtype.kind == "f"))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(states_equal(x, y) for x, y in zip(a, b))
    return bool(a == b) and type(a) is type(b)
