"""Pickle-free encoding of one component's state.

A *state* is a nested ``dict`` (string keys) whose leaves are torch tensors, numpy arrays,
numpy scalars or JSON values (``None``, bool, int, float, str, lists and dicts of them).
It is split in two:

* every tensor / array leaf goes into one safetensors mapping, under its path joined with
  ``/`` (``tables/item/rows``), so ``safe_open`` shows readable names;
* everything else is a JSON *document* ``{"codec_version", "tree", "leaves"}``: ``tree`` is
  the state with ``null`` where a tensor leaf was, and ``leaves`` lists, per such leaf,
  its exact path (dict keys as strings, list indices as ints — the flattened key is only
  a name, never parsed back), its kind, and what is needed to rebuild the same Python type.

Leaf kinds: ``torch`` (dtype kept by safetensors, bfloat16 included), ``numpy`` (stored
through ``torch.from_numpy`` without a copy, numpy dtype recorded), ``numpy_scalar``
(``np.float32(1.5)`` comes back as ``np.float32``), ``float`` (NaN/±inf, which JSON cannot
hold; orjson would silently write ``null``).

Tuples, sets, non-string dict keys and arbitrary objects are rejected with the path of
the offending value: a round trip must give back exactly what was saved.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch

CODEC_VERSION = 1
KEY_SEP = "/"

# What safetensors can store (and load back with the same dtype).
_TORCH_DTYPES = frozenset(
    {
        torch.bool,
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.uint16,
        torch.int32,
        torch.uint32,
        torch.int64,
        torch.uint64,
        torch.float16,
        torch.bfloat16,
        torch.float32,
        torch.float64,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
    }
)
_NUMPY_KINDS = frozenset("biuf")  # bool, signed, unsigned, floating

PathSeg = str | int


@dataclass(frozen=True)
class EncodedState:
    """One component, ready to write: ``tensors`` for safetensors, ``document`` as JSON bytes."""

    tensors: dict[str, torch.Tensor]
    document: bytes


def encode_state(state: Mapping[str, Any]) -> EncodedState:
    """Split ``state`` into tensor leaves and a JSON document (see module docstring).

    Raises ``TypeError``/``ValueError`` naming the path of anything that would not round-trip.
    Costs no tensor copy unless a tensor is non-contiguous, off-CPU, or shares its storage
    with an earlier leaf (safetensors refuses aliased tensors).
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"a component state must be a dict, got {type(state).__name__}")
    encoder = _Encoder()
    tree = encoder.walk(state, ())
    document = {"codec_version": CODEC_VERSION, "tree": tree, "leaves": encoder.leaves}
    try:
        blob = orjson.dumps(document)
    except orjson.JSONEncodeError as exc:  # e.g. an int beyond 64 bits
        raise TypeError(f"state is not JSON-serialisable: {exc}") from exc
    return EncodedState(tensors=encoder.tensors, document=blob)


def decode_state(document: bytes, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Inverse of :func:`encode_state`. ``tensors`` is what safetensors loaded (CPU tensors).

    Numpy leaves share memory with the loaded tensors (``Tensor.numpy()``, no copy).
    Raises ``ValueError`` if the document and the tensors do not fit together.
    """
    doc = orjson.loads(document)
    if not isinstance(doc, dict) or doc.get("codec_version") != CODEC_VERSION:
        raise ValueError(f"unsupported state document (codec_version {doc.get('codec_version')!r})")
    tree = doc["tree"]
    for leaf in doc["leaves"]:
        _put(tree, leaf["path"], _decode_leaf(leaf, tensors))
    if not isinstance(tree, dict):
        raise ValueError("state document's tree is not an object")
    return tree


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.leaves: list[dict[str, Any]] = []
        self._storages: set[int] = set()

    def walk(self, value: Any, path: tuple[PathSeg, ...]) -> Any:
        # bool before int/float: bool is an int subclass and must stay a bool.
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            self.leaves.append({"path": list(path), "kind": "float", "value": repr(value)})
            return None
        if isinstance(value, Mapping):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise TypeError(f"{_show(path)}: dict key {key!r} is not a str")
                out[key] = self.walk(item, (*path, key))
            return out
        if isinstance(value, list):
            return [self.walk(item, (*path, i)) for i, item in enumerate(value)]
        if isinstance(value, torch.Tensor):
            self._add_tensor(path, "torch", self._torch_leaf(value, path), {})
            return None
        if isinstance(value, np.ndarray):
            tensor = _numpy_to_torch(value, path)
            self._add_tensor(path, "numpy", tensor, {"dtype": value.dtype.name})
            return None
        if isinstance(value, np.generic):
            array = np.asarray(value)
            tensor = _numpy_to_torch(array, path)
            self._add_tensor(path, "numpy_scalar", tensor, {"dtype": array.dtype.name})
            return None
        raise TypeError(
            f"{_show(path)}: {type(value).__name__} cannot be stored "
            "(use tensors, numpy arrays, or JSON values; lists, not tuples)"
        )

    def _torch_leaf(self, tensor: torch.Tensor, path: tuple[PathSeg, ...]) -> torch.Tensor:
        if tensor.layout != torch.strided:
            raise TypeError(f"{_show(path)}: only dense tensors can be stored, got {tensor.layout}")
        if tensor.dtype not in _TORCH_DTYPES:
            raise TypeError(f"{_show(path)}: dtype {tensor.dtype} cannot be stored")
        tensor = tensor.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        return tensor

    def _add_tensor(self, path: tuple[PathSeg, ...], kind: str, tensor: torch.Tensor, extra: dict[str, Any]) -> None:
        key = KEY_SEP.join(str(seg) for seg in path)
        if key in self.tensors:
            raise ValueError(f"two leaves flatten to the key {key!r}; avoid {KEY_SEP!r} in dict keys")
        storage = tensor.untyped_storage().data_ptr()
        if storage and storage in self._storages:
            tensor = tensor.clone()  # an alias of an earlier leaf; safetensors refuses aliases
        self._storages.add(tensor.untyped_storage().data_ptr())
        self.tensors[key] = tensor
        self.leaves.append({"path": list(path), "kind": kind, "key": key, **extra})


def _numpy_to_torch(array: np.ndarray, path: tuple[PathSeg, ...]) -> torch.Tensor:
    if array.dtype.kind not in _NUMPY_KINDS:
        raise TypeError(f"{_show(path)}: numpy dtype {array.dtype} cannot be stored")
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)  # (never 0-d: ascontiguousarray would make it 1-d)
    with warnings.catch_warnings():
        # Read-only arrays are fine: the tensor is only read while it is written to disk.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        try:
            return torch.from_numpy(array)
        except TypeError as exc:  # e.g. float128
            raise TypeError(f"{_show(path)}: numpy dtype {array.dtype} cannot be stored") from exc


def _decode_leaf(leaf: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    kind = leaf["kind"]
    if kind == "float":
        return float(leaf["value"])
    tensor = tensors.get(leaf["key"])
    if tensor is None:
        raise ValueError(f"tensor {leaf['key']!r} is missing")
    if kind == "torch":
        return tensor
    array = tensor.numpy()
    if array.dtype.name != leaf["dtype"]:
        raise ValueError(f"tensor {leaf['key']!r} has dtype {array.dtype}, expected {leaf['dtype']}")
    if kind == "numpy":
        return array
    if kind == "numpy_scalar":
        return array[()]
    raise ValueError(f"unknown leaf kind {kind!r}")


def _put(tree: Any, path: list[PathSeg], value: Any) -> None:
    if not path:
        raise ValueError("a leaf path is empty")
    node = tree
    for seg in path[:-1]:
        node = node[seg]
    node[path[-1]] = value


def _show(path: tuple[PathSeg, ...]) -> str:
    return "state" + "".join(f"[{seg!r}]" for seg in path)
