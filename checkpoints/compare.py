"""Compare two checkpoints' states value by value: the judge of exactly-once recovery.

A crash-and-replay run must end in the same state as an uninterrupted run (DESIGN §6.1).
:func:`state_differences` walks two component trees (the ``components`` of loaded
checkpoints: dicts, lists, tensors, numpy arrays, scalars) and names every leaf that
differs — bit for bit, NaN equal to NaN at the same place — except the paths the
caller excludes, each excluded for a stated reason.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch


def state_differences(a: Mapping[str, Any], b: Mapping[str, Any], exclude: Mapping[str, str] = {}) -> list[str]:
    """Dotted paths where ``a`` and ``b`` differ, with a short why, sorted.

    ``exclude`` maps ``fnmatch`` patterns of dotted paths (``monitors.gate.*.wall_time``)
    to the reason they may differ; matching paths (and everything below them) are skipped.
    """
    return sorted(_walk(a, b, "", exclude))


def _walk(a: Any, b: Any, path: str, exclude: Mapping[str, str]) -> Iterator[str]:
    if path and any(fnmatch.fnmatchcase(path, pattern) for pattern in exclude):
        return
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                if not any(fnmatch.fnmatchcase(where, pattern) for pattern in exclude):
                    yield f"{where}: only in {'second' if key not in a else 'first'}"
                continue
            yield from _walk(a[key], b[key], where, exclude)
        return
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            yield f"{path}: length {len(a)} vs {len(b)}"
            return
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _walk(x, y, f"{path}[{i}]", exclude)
        return
    if _is_array(a) or _is_array(b):
        why = _array_difference(a, b)
        if why:
            yield f"{path}: {why}"
        return
    if not _same_scalar(a, b):
        yield f"{path}: {a!r:.80} vs {b!r:.80}"


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def _array_difference(a: Any, b: Any) -> str:
    if not (_is_array(a) and _is_array(b)):
        return f"{type(a).__name__} vs {type(b).__name__}"
    x = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a
    y = b.detach().cpu().numpy() if isinstance(b, torch.Tensor) else b
    if x.dtype != y.dtype or x.shape != y.shape:
        return f"{x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
    if x.dtype.kind == "O":
        differ = int(sum(p != q for p, q in zip(x.ravel().tolist(), y.ravel().tolist())))
    elif x.size:  # bitwise: -0.0 != 0.0 and NaN == NaN of the same bits, as a replay must reproduce
        bytes_x = np.ascontiguousarray(x).view(np.uint8).reshape(x.size, -1)
        bytes_y = np.ascontiguousarray(y).view(np.uint8).reshape(y.size, -1)
        differ = int((bytes_x != bytes_y).any(axis=1).sum())
    else:
        differ = 0
    return f"{differ} of {x.size} values differ" if differ else ""


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)  # NaN at the same place is the same state
    return type(a) is type(b) and a == b
