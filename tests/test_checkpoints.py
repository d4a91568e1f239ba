"""Checkpoint store: state encoding, atomic save, verified load with fallback.

Also home of the small helpers the other ``test_checkpoints_*`` modules import
(fake clock, state builder, deep equality), so there is one copy of each.
"""

from __future__ import annotations

import ast
import math
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import checkpoints
from checkpoints import (
    CheckpointConfig,
    CheckpointError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointStore,
    NoIntactCheckpointError,
    checkpoint_name,
    ledger_state,
)
from checkpoints.codec import decode_state, encode_state

OFFSETS = {"events": {0: 10, 1: 7}}


class FakeClock:
    """Unix seconds that only move when told to."""

    def __init__(self, when: str = "2024-03-01T10:00:00") -> None:
        self.now = datetime.fromisoformat(when).replace(tzinfo=timezone.utc).timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_components(step: int) -> dict[str, dict[str, Any]]:
    """A small but varied checkpoint whose content depends on ``step``."""
    g = torch.Generator().manual_seed(step)
    return {
        "dense": {
            "format_version": 3,
            "weights": {
                "w": torch.randn(4, 3, generator=g),
                "b": torch.randn(3, generator=g).to(torch.bfloat16),
            },
            "step": step,
        },
        "emb_item": {
            "format_version": 1,
            "keys": torch.arange(step, step + 5, dtype=torch.int64),
            "rows": torch.randn(5, 2, generator=g),
            "slots": {"adagrad": torch.full((5, 2), float(step))},
            "alive": torch.tensor([True, False, True, True, False]),
            "counters": np.arange(5, dtype=np.int32) * step,
        },
        "joiner": {"format_version": 2, "pending": [{"req": "r1", "ts": 1700000000000 + step}], "watermark": None},
        "ledger": ledger_state(np.arange(step * 10, step * 10 + 10)),
    }


def assert_same(a: Any, b: Any, path: str = "state") -> None:
    """Deep equality that also requires the same Python type and dtype at every leaf."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{path}: values differ"
    elif isinstance(a, (np.ndarray, np.generic)):
        assert a.dtype == b.dtype and np.shape(a) == np.shape(b), f"{path}: {a.dtype} != {b.dtype}"
        assert np.array_equal(a, b), f"{path}: values differ"
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: {b} is not nan"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_checkpoint_is(store: CheckpointStore, name: str | None, step: int) -> None:
    """``store.load(name)`` returns exactly what ``make_components(step)`` saved."""
    ckpt = store.load(name)
    assert ckpt.name == checkpoint_name(step)
    assert_same(ckpt.components, make_components(step))


def save_step(store: CheckpointStore, step: int) -> str:
    return store.save(
        step, make_components(step), offsets={"events": {0: step}}, watermark=step * 1000, config_hash="cfg"
    ).name


FAST = CheckpointConfig(fsync=False, keep_last=100, keep_daily=0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[CheckpointStore]:
    with CheckpointStore(tmp_path / "ckpt", FAST, clock=clock) as s:
        yield s


# ---------------------------------------------------------------------- codec


def test_codec_round_trips_every_leaf_kind() -> None:
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    readonly = np.arange(3, dtype=np.int16)
    readonly.flags.writeable = False
    shared = torch.arange(6, dtype=torch.float32)
    arrays = {
        "f64": base,
        "view": base[:, ::2],
        "big_endian": np.arange(3, dtype=">i4"),
        "readonly": readonly,
        "zero_d": np.array(7, dtype=np.uint16),
        "bool": np.array([True, False]),
    }
    state: dict[str, Any] = {
        "format_version": 1,
        "torch": {
            str(dt): torch.arange(6).reshape(2, 3).to(dt)
            for dt in (torch.int64, torch.float32, torch.bfloat16, torch.bool, torch.float16, torch.uint8, torch.int8)
        },
        "scalar_tensor": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.arange(12.0).reshape(3, 4).T,  # non-contiguous: stored contiguous
        "alias_a": shared,
        "alias_b": shared,  # same storage twice: safetensors would refuse without a clone
        "grad": torch.ones(2, requires_grad=True),
        "numpy": arrays,
        "np_scalar": np.float32(1.5),
        "json": {"none": None, "t": True, "i": -3, "big": 2**62, "f": 0.25, "s": "é", "nested": [[1, 2], {"k": []}]},
        "non_finite": [float("nan"), float("inf"), float("-inf")],
        "mixed_list": [1, torch.tensor([1, 2]), "x", np.array([3.0])],
    }
    encoded = encode_state(state)
    back = decode_state(encoded.document, {k: v.clone() for k, v in encoded.tensors.items()})
    expected = dict(state, numpy=dict(arrays, big_endian=np.arange(3, dtype="=i4")))  # native byte order
    assert_same(back, expected)
    assert "numpy/f64" in encoded.tensors and "mixed_list/1" in encoded.tensors  # readable flat keys


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"format_version": 1, "t": (1, 2)}, "tuple"),
        ({"format_version": 1, "d": {1: "x"}}, "not a str"),
        ({"format_version": 1, "o": object()}, "object"),
        ({"format_version": 1, "c": np.zeros(2, dtype=np.complex64)}, "complex64"),
        ({"format_version": 1, "s": torch.zeros(3).to_sparse()}, "dense"),
        ({"format_version": 1, "a/b": torch.zeros(1), "a": {"b": torch.zeros(1)}}, "flatten to the key"),
        ({"format_version": 1, "huge": 2**70}, "JSON"),
    ],
    ids=["tuple", "int-key", "object", "complex", "sparse", "key-collision", "int-overflow"],
)
def test_codec_rejects_what_would_not_round_trip(state: dict[str, Any], message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        encode_state(state)


text = st.text(st.characters(codec="utf-8"), max_size=8)  # lone surrogates cannot be JSON
json_leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats() | text
json_trees = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=st.dictionaries(text, json_trees, max_size=5))
def test_codec_round_trips_any_json_tree(tree: dict[str, Any]) -> None:
    assert_same(decode_state(encode_state(tree).document, {}), tree)


# ------------------------------------------------------------------ save/load


def test_save_load_round_trip_and_manifest(store: CheckpointStore, clock: FakeClock) -> None:
    first = store.save(
        5, make_components(5), offsets=OFFSETS, watermark=123, config_hash="abc", extra_meta={"host": "a"}
    )
    clock.advance(60)
    second = save_step(store, 9)
    assert (first.name, second) == ("ckpt-000000000005", "ckpt-000000000009")
    assert (store.root / "LATEST").read_text() == "ckpt-000000000009\n"

    ckpt = store.load(first.name)
    assert_same(ckpt.components, make_components(5))
    assert (ckpt.step, ckpt.watermark, ckpt.offsets) == (5, 123, OFFSETS)
    m = ckpt.manifest
    assert (m.config_hash, m.parent, m.extra, m.wall_time) == ("abc", None, {"host": "a"}, first.manifest.wall_time)
    assert m.components["dense"].format_version == 3 and m.components["joiner"].files == ["joiner.json"]
    assert sorted([f.path for f in m.files] + ["MANIFEST.json"]) == sorted(os.listdir(ckpt.path))
    latest = store.load()
    assert latest.name == second and latest.manifest.parent == first.name and latest.skipped == ()
    assert latest.manifest.wall_time == clock.now


def test_partial_load_reads_only_the_named_components(store: CheckpointStore) -> None:
    name = save_step(store, 1)
    (store.root / name / "dense.safetensors").write_bytes(b"garbage")  # not read below
    ckpt = store.load(name, components=["ledger"])
    assert list(ckpt.components) == ["ledger"]
    with pytest.raises(KeyError, match="nope"):
        store.load(name, components=["nope"])


def test_save_validates_before_touching_the_disk(store: CheckpointStore) -> None:
    bad_inputs = [
        ({"Bad.Name": {"format_version": 1}}, "component name"),
        ({"dense": {"w": torch.zeros(1)}}, "format_version"),
        ({"dense": {"format_version": True}}, "format_version"),
        ({"dense": {"format_version": 1, "t": (1,)}}, "tuple"),
        ({}, "at least one"),
    ]
    for components, message in bad_inputs:
        with pytest.raises((TypeError, ValueError), match=message):
            store.save(1, components, offsets={}, watermark=None, config_hash="c")
    with pytest.raises(TypeError, match="extra_meta"):
        store.save(1, make_components(1), offsets={}, watermark=None, config_hash="c", extra_meta={"x": object()})
    assert os.listdir(store.root) == [".lock"]


# --------------------------------------------------------- damage and fallback


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 3)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: _flip_byte(d / "emb_item.safetensors"), "emb_item.safetensors sha256 mismatch"),
        (lambda d: _flip_byte(d / "joiner.json"), "joiner.json sha256 mismatch"),
        (lambda d: _truncate(d / "dense.safetensors"), "dense.safetensors has"),
        (lambda d: (d / "ledger.json").unlink(), "ledger.json is missing"),
        (lambda d: (d / "MANIFEST.json").unlink(), "MANIFEST.json is missing"),
        (lambda d: _truncate(d / "MANIFEST.json"), "MANIFEST.json invalid"),
    ],
    ids=["flip-tensor", "flip-json", "truncate-tensor", "delete-file", "delete-manifest", "truncate-manifest"],
)
def test_damaged_latest_is_detected_and_previous_loaded(store: CheckpointStore, damage: Any, reason: str) -> None:
    save_step(store, 1)
    newest = save_step(store, 2)
    damage(store.root / newest)

    ckpt = store.load()
    assert ckpt.name == checkpoint_name(1)
    assert_same(ckpt.components, make_components(1))
    assert [s.name for s in ckpt.skipped] == [newest] and reason in ckpt.skipped[0].reason
    assert store.latest_intact().name == checkpoint_name(1)
    assert not store.verify(newest).intact and store.verify(checkpoint_name(1)).intact


@pytest.mark.parametrize(
    ("latest", "reason"),
    [(None, "missing"), ("garbage\x00", "not a checkpoint"), ("ckpt-000000000042", "not a checkpoint")],
    ids=["missing", "garbage", "dangling"],
)
def test_bad_latest_pointer_falls_back_to_newest_intact(
    store: CheckpointStore, latest: str | None, reason: str
) -> None:
    save_step(store, 1)
    save_step(store, 2)
    pointer = store.root / "LATEST"
    pointer.unlink() if latest is None else pointer.write_text(latest)
    ckpt = store.load()
    assert ckpt.name == checkpoint_name(2)
    assert ckpt.skipped[0].name == "LATEST" and reason in ckpt.skipped[0].reason


def test_latest_is_preferred_over_a_newer_uncommitted_checkpoint(store: CheckpointStore) -> None:
    """A crash between rename and LATEST leaves a complete newer directory: LATEST still rules."""
    save_step(store, 1)
    save_step(store, 2)
    (store.root / "LATEST").write_text(checkpoint_name(1))
    assert_checkpoint_is(store, None, 1)


def test_nothing_to_load_vs_nothing_intact(store: CheckpointStore) -> None:
    with pytest.raises(CheckpointNotFoundError):
        store.load()
    name = save_step(store, 1)
    (store.root / name / "MANIFEST.json").unlink()
    with pytest.raises(NoIntactCheckpointError, match=r"MANIFEST\.json is missing") as info:
        store.load()
    assert [s.name for s in info.value.skipped] == [name]
    with pytest.raises(CheckpointNotFoundError):
        store.load("ckpt-000000000077")


# ---------------------------------------------------------------- same step


def test_resaving_identical_step_reuses_the_existing_directory(store: CheckpointStore, clock: FakeClock) -> None:
    save_step(store, 1)
    first = store.save(2, make_components(2), offsets={"events": {0: 2}}, watermark=2000, config_hash="cfg")
    (store.root / "LATEST").write_text(checkpoint_name(1))  # as if LATEST never moved (crash)
    clock.advance(5)
    again = store.save(2, make_components(2), offsets={"events": {0: 2}}, watermark=2000, config_hash="cfg")
    assert again.reused and again.manifest == first.manifest  # the original, not a rewrite
    assert store.latest_pointer() == again.name
    assert sorted(os.listdir(store.root)) == [".lock", "LATEST", checkpoint_name(1), checkpoint_name(2)]


def test_resaving_step_with_new_content_replaces_it(store: CheckpointStore) -> None:
    save_step(store, 1)
    name = save_step(store, 2)
    info = store.save(2, make_components(7), offsets={"events": {0: 7}}, watermark=None, config_hash="cfg")
    assert not info.reused and info.name == name
    ckpt = store.load()
    assert ckpt.name == name and ckpt.offsets == {"events": {0: 7}}
    assert_same(ckpt.components, make_components(7))
    assert ckpt.manifest.parent == checkpoint_name(1)  # LATEST's parent, never itself
    assert not [n for n in os.listdir(store.root) if n.startswith(".replaced")]


# ------------------------------------------------------ opening: lock, cleanup


def test_writer_lock_and_readonly_access(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    with CheckpointStore(root, FAST) as writer:
        save_step(writer, 1)
        with pytest.raises(CheckpointLockedError):
            CheckpointStore(root, FAST)
        reader = CheckpointStore(root, readonly=True)
        assert_checkpoint_is(reader, None, 1)
        with pytest.raises(CheckpointError, match="read-only"):
            save_step(reader, 2)
    with CheckpointStore(root, FAST) as again:  # lock released by close()
        assert again.latest_pointer() == checkpoint_name(1)
    assert CheckpointStore(tmp_path / "absent", readonly=True).list_checkpoints() == []
    assert not (tmp_path / "absent").exists()


def test_opening_a_writer_cleans_up_after_crashes(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    with CheckpointStore(root, FAST) as s:
        save_step(s, 1)
        save_step(s, 2)
    os.rename(root / checkpoint_name(2), root / ".replaced-ckpt-000000000002-abcd1234")  # crash mid-replace
    (root / ".replaced-ckpt-000000000001-ffff0000").mkdir()  # its name is taken: just garbage
    (root / ".tmp-ckpt-3-0a0b0c0d").mkdir()
    (root / ".tmp-ckpt-3-0a0b0c0d" / "dense.json").write_text("{}")
    (root / ".trash-ckpt-000000000000-12345678").mkdir()
    (root / ".LATEST.tmp-1234abcd").write_text("ckpt-000000000003\n")
    (root / "daily").mkdir()
    (root / "daily" / ".2024-03-01.tmp-99999999").write_text("x")

    with CheckpointStore(root, FAST, readonly=True):
        assert len(os.listdir(root)) == 9  # a reader never cleans: a daemon may be mid-save
    with CheckpointStore(root, FAST) as s:
        assert sorted(os.listdir(root)) == [".lock", "LATEST", checkpoint_name(1), checkpoint_name(2), "daily"]
        assert os.listdir(root / "daily") == []
        assert_checkpoint_is(s, None, 2)


def test_loaded_state_is_private_so_training_in_place_leaves_the_checkpoint_intact(store: CheckpointStore) -> None:
    name = save_step(store, 1)
    emb = store.load(name).components["emb_item"]
    emb["rows"].add_(1.0)  # safetensors maps the file copy-on-write: this must not reach the disk
    emb["counters"][:] = -1
    assert store.verify(name).intact
    assert_checkpoint_is(store, name, 1)


def test_checkpoints_is_a_leaf_package() -> None:
    """STYLE.md §1: checkpoints/ imports third-party libraries and itself, nothing of ours."""
    forbidden = {"streamtrain", "consumers", "monitors"}
    for path in Path(checkpoints.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            assert not roots & forbidden, f"{path.name} imports {roots & forbidden}"


def test_a_save_after_restoring_past_a_damaged_latest_names_what_was_restored(store: CheckpointStore) -> None:
    """LATEST damaged, the restore falls back to the one before: the next save must descend
    from that one, or the ledger chain would run through the damaged checkpoint and count
    the samples trained again after the fallback twice."""
    for step in (1, 2, 3):
        save_step(store, step)
    damaged = store.root / checkpoint_name(3)
    victim = next(p for p in damaged.iterdir() if p.suffix == ".json" and p.name != "MANIFEST.json")
    victim.write_bytes(victim.read_bytes()[:-1] + b" ")
    restored = store.load()
    assert restored.name == checkpoint_name(2) and restored.skipped
    store.continue_from(restored.name)
    info = store.save(4, make_components(4), offsets={}, watermark=None, config_hash="cfg")
    assert info.manifest.parent == checkpoint_name(2)
    nxt = store.save(5, make_components(5), offsets={}, watermark=None, config_hash="cfg")
    assert nxt.manifest.parent == checkpoint_name(4)  # after a save, LATEST leads again
