"""What a save will write, decided before the disk is touched, and whether a re-save of a
step may keep the checkpoint already there: pure functions of states and manifests.

Everything that can be wrong with a caller's input (a step out of range, a bad component
name, a missing ``format_version``, a leaf the codec cannot store, non-JSON metadata)
raises here, so a refused save leaves nothing behind.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from .codec import EncodedState, encode_state
from .manifest import Manifest, check_component_name, checkpoint_name


@dataclass(frozen=True)
class SavePlan:
    name: str  # ckpt-<step:012d>
    encoded: dict[str, tuple[int, EncodedState]]  # component -> (its format_version, its files' content)
    template: Manifest  # everything but parent, components and files, which the writing fills in


def plan_save(
    step: int,
    components: Mapping[str, Mapping[str, Any]],
    *,
    offsets: Mapping[str, Mapping[int, int]],
    watermark: int | None,
    config_hash: str,
    extra_meta: Mapping[str, Any] | None,
    clock: Callable[[], float],
) -> SavePlan:
    """Validate and encode everything :meth:`CheckpointStore.save` was given.

    ``clock`` stamps the manifest's ``wall_time`` (read once, after encoding). Raises
    ``ValueError`` / ``TypeError`` on input that cannot be stored.
    """
    name = checkpoint_name(step)
    encoded = _encode_components(components)
    template = Manifest(
        step=step,
        wall_time=clock(),
        watermark=watermark,
        offsets={topic: dict(parts) for topic, parts in offsets.items()},
        config_hash=config_hash,
        parent=None,
        components={},
        files=[],
        extra=_json_checked(dict(extra_meta or {})),
    )
    return SavePlan(name, encoded, template)


def same_content(a: Manifest, b: Manifest) -> bool:
    """Same checkpoint in all but the wall time of the save: a replay re-saving a step whose
    directory was renamed in before ``LATEST`` moved may keep it instead of rewriting it."""

    def key(m: Manifest) -> tuple[Any, ...]:
        files = sorted((f.path, f.bytes, f.sha256) for f in m.files)
        return (m.format_version, m.step, m.watermark, m.offsets, m.config_hash, m.parent, m.extra, m.components, files)

    return key(a) == key(b)


def _encode_components(components: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[int, EncodedState]]:
    """Validate names and format versions and encode every state."""
    if not components:
        raise ValueError("a checkpoint needs at least one component")
    out = {}
    for name, state in components.items():
        check_component_name(name)
        version = state.get("format_version") if isinstance(state, Mapping) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"component {name!r}: state must carry an int 'format_version'")
        out[name] = (version, encode_state(state))
    return out


def _json_checked(meta: dict[str, Any]) -> dict[str, Any]:
    try:
        orjson.dumps(meta)
    except orjson.JSONEncodeError as exc:
        raise TypeError(f"extra_meta is not JSON-serialisable: {exc}") from exc
    return meta
