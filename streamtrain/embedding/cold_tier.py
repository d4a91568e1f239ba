"""The cold tier contract: where evicted rows wait for their key's next admission.

A tier only moves bytes (one fixed-size record per key and version); :class:`RecordCodec`
turns row tensors into records and back with plain little-endian numpy bytes -- no
pickle, so a record written by one release is readable by any reader that knows the layout.

Versions make the tier replay-safe. A table writes and reads at its own step counter
(``EmbeddingTable.step``, part of its checkpoint), and a read never deletes. A read at
step ``t`` sees, per key, the record with the largest version ``<= t``: exactly the
latest record an uninterrupted run had written when it read that key, whatever a killed
process wrote after the checkpoint a replay restarted from (later versions are invisible
to the replay until it rewrites them byte for byte; see docs/architecture.md, "Dynamic
embeddings"). Garbage goes only when :meth:`ColdTier.retain_from` says no restore can
read below a step any more.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

_NUMPY_DTYPES: Mapping[torch.dtype, np.dtype] = {
    torch.float32: np.dtype("<f4"),
    torch.int64: np.dtype("<i8"),
}
_HEADER = np.dtype("<u8")


class ColdTier(Protocol):
    """A versioned key -> bytes store with batch operations; implementations own their IO errors.

    Called from the table's thread only: ``put`` / ``get`` during training steps,
    ``retain_from`` between steps (after a checkpoint commit).
    """

    def put(self, keys: Sequence[int], records: Sequence[bytes], step: int) -> None:
        """Store each key's record as its version ``step`` (replacing only that version)."""

    def get(self, keys: Sequence[int], step: int) -> list[bytes | None]:
        """Each key's record with the largest version ``<= step``; ``None`` where there is none.

        Deletes nothing: a replay from an older checkpoint must find what this read found.
        """

    def retain_from(self, step: int) -> None:
        """No read will ask for a step below ``step`` any more (it is the table step of the
        oldest checkpoint still retained): drop, per key, the versions older than its newest
        version ``<= step`` -- no read at ``>= step`` can return them."""


def version_at(versions: Collection[int], step: int) -> int | None:
    """The version a read at ``step`` returns: the largest ``<= step`` (None: a miss)."""
    return max((v for v in versions if v <= step), default=None)


def garbage(versions: Collection[int], step: int) -> list[int]:
    """Versions no read at ``>= step`` can return: those older than :func:`version_at` ``(step)``."""
    keep = version_at(versions, step)
    return [] if keep is None else [v for v in versions if v < keep]


class MemoryColdTier:
    """The contract in process memory: its reference semantics (the Redis tier is tested
    against it) and a fake for table tests. Holds every record it is given: not for
    production tables, which spill precisely because rows do not fit in memory."""

    def __init__(self) -> None:
        self.versions: dict[int, dict[int, bytes]] = {}  # key -> {step: record}

    def put(self, keys: Sequence[int], records: Sequence[bytes], step: int) -> None:
        for key, record in zip(keys, records, strict=True):
            self.versions.setdefault(key, {})[step] = record

    def get(self, keys: Sequence[int], step: int) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            versions = self.versions.get(key, {})
            at = version_at(versions, step)
            out.append(None if at is None else versions[at])
        return out

    def retain_from(self, step: int) -> None:
        for versions in self.versions.values():
            for v in garbage(versions, step):
                del versions[v]


class RecordCodec:
    """Fixed-size records: an 8-byte layout fingerprint, then each field's row bytes in order.

    fields: name -> (dtype, per-row shape), e.g. ``{"weight": (torch.float32, (64,))}``.
    A record whose length or fingerprint does not match (written under another dim or
    optimizer) decodes as invalid instead of as garbage.
    """

    def __init__(self, fields: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> None:
        self.fields = dict(fields)
        self._widths = {name: int(np.prod(shape, dtype=np.int64)) for name, (_, shape) in self.fields.items()}
        spec = ";".join(f"{n}:{dt}:{shape}" for n, (dt, shape) in self.fields.items())
        self._fingerprint = int.from_bytes(hashlib.blake2b(spec.encode(), digest_size=8).digest(), "little")
        self.record_bytes = _HEADER.itemsize + sum(
            self._widths[n] * _NUMPY_DTYPES[dt].itemsize for n, (dt, _) in self.fields.items()
        )

    def encode(self, values: Mapping[str, torch.Tensor]) -> list[bytes]:
        """values: name -> (K, *shape) tensors -> K records."""
        count = next(iter(values.values())).shape[0]
        header = np.full((count, 1), self._fingerprint, dtype=_HEADER).view(np.uint8)  # (K, 8)
        parts = [header]
        for name, (dtype, _) in self.fields.items():
            arr = values[name].detach().to("cpu").numpy().astype(_NUMPY_DTYPES[dtype], copy=False)
            parts.append(np.ascontiguousarray(arr.reshape(count, -1)).view(np.uint8))  # (K, bytes)
        flat = np.concatenate(parts, axis=1).tobytes()  # (K * record_bytes)
        size = self.record_bytes
        return [flat[i * size : (i + 1) * size] for i in range(count)]

    def decode(self, records: Sequence[bytes | None], device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """K records (None: missing) -> (valid (K,) bool, name -> (V, *shape) tensors of the V valid ones)."""
        ok = np.array([r is not None and len(r) == self.record_bytes for r in records], dtype=bool)
        present = [r for r, good in zip(records, ok) if good and r is not None]
        buf = np.frombuffer(b"".join(present), dtype=np.uint8)
        buf = buf.reshape(-1, self.record_bytes)  # (V', record_bytes)
        fingerprint_ok = buf[:, : _HEADER.itemsize].copy().view(_HEADER)[:, 0] == self._fingerprint  # (V',)
        ok[ok] = fingerprint_ok
        buf = buf[fingerprint_ok]
        out: dict[str, torch.Tensor] = {}
        at = _HEADER.itemsize
        for name, (dtype, shape) in self.fields.items():
            nbytes = self._widths[name] * _NUMPY_DTYPES[dtype].itemsize
            arr = np.ascontiguousarray(buf[:, at : at + nbytes]).view(_NUMPY_DTYPES[dtype]).reshape(-1, *shape)
            out[name] = torch.from_numpy(arr).to(device=device, dtype=dtype)
            at += nbytes
        return torch.from_numpy(ok).to(device), out
