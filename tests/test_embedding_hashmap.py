"""The vectorised hash map and its hashing: equal to a dict, bounded, deterministic."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtrain.embedding.admission import CountMinSketch
from streamtrain.embedding.hashing import mix64, uniform_rows
from streamtrain.embedding.hashmap import MAX_PROBE_DISTANCE, PROBE_WINDOW, TensorHashMap

_M = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def test_mix64_is_splitmix64_bit_for_bit() -> None:
    values = [0, 1, 2, -1, 12345678901234, -(1 << 63), (1 << 63) - 1, 0x5DEECE66D]
    got = mix64(torch.tensor(values, dtype=torch.int64)).tolist()
    assert [g & _M for g in got] == [_splitmix64(v & _M) for v in values]


def test_initial_rows_depend_only_on_key_and_salt() -> None:
    keys = torch.tensor([7, 3, 99], dtype=torch.int64)
    rows = uniform_rows(keys, dim=16, bound=0.05, salt=1)  # (3, 16)
    assert torch.equal(rows[[1, 2]], uniform_rows(keys[[1, 2]], dim=16, bound=0.05, salt=1))
    assert not torch.equal(rows, uniform_rows(keys, dim=16, bound=0.05, salt=2))
    assert rows.abs().max() <= 0.05 and rows.std() > 0.01


ops = st.lists(
    st.tuples(st.sampled_from(["insert", "remove"]), st.lists(st.integers(-(1 << 62), 1 << 62).filter(bool), max_size=40)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, max_load=st.sampled_from([0.25, 0.5, 0.9]))
def test_hashmap_equals_a_dict(ops: list[tuple[str, list[int]]], max_load: float) -> None:
    # Tiny initial capacity: every batch collides, claims the same slots and forces rehashes.
    table, ref = TensorHashMap(1, max_load), {}
    next_value = 0
    for op, batch in ops:
        keys = torch.tensor(sorted(set(batch)), dtype=torch.int64)
        if op == "insert":
            keys = keys[[k not in ref for k in keys.tolist()]]
            values = torch.arange(next_value, next_value + keys.numel())
            next_value += keys.numel()
            table.insert(keys, values)
            ref.update(zip(keys.tolist(), values.tolist()))
        else:
            removed = table.remove(keys).tolist()
            assert removed == [ref.pop(k, -1) for k in keys.tolist()]
        assert table.size == len(ref) and table.load_factor <= max_load
        probe = torch.tensor(sorted(ref) + [3, -3, 1 << 61], dtype=torch.int64)
        assert table.lookup(probe).tolist() == [ref.get(k, -1) for k in probe.tolist()]
        live_keys, live_values = table.items()
        assert dict(zip(live_keys.tolist(), live_values.tolist())) == ref
        assert table.max_probe_distance < MAX_PROBE_DISTANCE + PROBE_WINDOW


def test_contended_slots_get_one_key_each() -> None:
    # Half-full power-of-two table: many of 3000 keys share home slots in a single batch.
    table = TensorHashMap(4096, 0.9)
    keys = torch.randperm(1 << 20, generator=torch.Generator().manual_seed(0))[:3000].add(1).sort().values
    table.insert(keys, torch.arange(3000))
    assert torch.equal(table.lookup(keys), torch.arange(3000))
    slots_keys, _ = table.items()
    assert slots_keys.numel() == torch.unique(slots_keys).numel() == 3000


def test_layout_is_deterministic() -> None:
    keys = torch.arange(1, 2000, dtype=torch.int64) * 7919
    a, b = TensorHashMap(16, 0.5), TensorHashMap(16, 0.5)
    for t in (a, b):
        t.insert(keys[:1000], torch.arange(1000))
        t.remove(keys[::3])
        t.insert(keys[1000:], torch.arange(999))
    assert torch.equal(a._keys, b._keys) and torch.equal(a._values, b._values)


def test_inserting_a_present_key_raises() -> None:
    table = TensorHashMap(8, 0.5)
    table.insert(torch.tensor([5, 6]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="already present"):
        table.insert(torch.tensor([6]), torch.tensor([2]))


def test_count_min_sketch_never_underestimates() -> None:
    sketch = CountMinSketch(width=64, depth=3)  # tiny: collisions are certain
    gen = torch.Generator().manual_seed(1)
    keys = torch.arange(1, 501)
    truth = torch.zeros(500, dtype=torch.int64)
    for _ in range(5):
        counts = torch.randint(0, 4, (500,), generator=gen)
        truth += counts
        estimate = sketch.add(keys, counts)
        assert (estimate >= truth).all()
    assert torch.equal(sketch.estimate(keys), estimate)
    sketch.halve()
    assert (sketch.estimate(keys) >= truth // 2).all()
