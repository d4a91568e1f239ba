"""Component states as bytes, to move them between ranks: the checkpoint codec
(``checkpoints/codec.py``: safetensors for tensors and arrays, JSON for the rest), never
pickle. ``torch.distributed``'s ``*_object`` collectives pickle, so they are not used."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from checkpoints.codec import decode_state, encode_state

_LENGTH_BYTES = 8


def pack_state(state: Mapping[str, Any]) -> bytes:
    """``len(document) | document (JSON) | tensors (safetensors)``."""
    encoded = encode_state(state)
    return len(encoded.document).to_bytes(_LENGTH_BYTES, "little") + encoded.document + save_tensors(encoded.tensors)


def unpack_state(data: bytes) -> dict[str, Any]:
    size = int.from_bytes(data[:_LENGTH_BYTES], "little")
    document = data[_LENGTH_BYTES:_LENGTH_BYTES + size]
    return decode_state(document, load_tensors(data[_LENGTH_BYTES + size:]))
