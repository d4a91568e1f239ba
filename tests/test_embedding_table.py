"""The dynamic table: collision-freedom, admission, eviction policies, state round-trips."""

from __future__ import annotations

import json
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from streamtrain.embedding import DEFAULT_ROW, PAD_ROW, EmbeddingTable, EmbeddingTableConfig
from streamtrain.embedding.hashing import uniform_rows
from streamtrain.modules.dynamic_embedding import DynamicEmbedding


def config(**overrides: Any) -> EmbeddingTableConfig:
    base: dict[str, Any] = {
        "dim": 4,
        "initial_rows": 4,
        "max_rows": 64,
        "admission": {"min_count": 1, "sketch_width": 1024},
        "eviction": {"policy": "lfu", "every_n_steps": 0},
        "optimizer": {"kind": "sgd", "lr": 0.1},
    }
    for key, value in overrides.items():
        base[key] = base[key] | value if isinstance(value, dict) else value
    return EmbeddingTableConfig(**base)


def train_step(module: DynamicEmbedding, ids: list[int] | torch.Tensor, now_ms: int | None = None) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.int64)
    out = module(ids, now_ms=now_ms)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    module.apply_gradients()
    return out.detach()


def rows_of(table: EmbeddingTable, keys: list[int]) -> list[int]:
    hit = table.lookup(torch.tensor(keys), train=False)
    return hit.rows[hit.inverse].tolist()


def live_keys(table: EmbeddingTable) -> set[int]:
    return set(table.row_keys[table.row_keys != 0].tolist())


def check_invariants(table: EmbeddingTable) -> None:
    keys = table.row_keys
    live = (keys != 0).nonzero().squeeze(1)
    assert torch.unique(keys[live]).numel() == live.numel(), "two rows hold one key"
    assert torch.equal(table._map.lookup(keys[live]), live), "map and row_keys disagree"
    assert table.size == live.numel() <= table.config.max_rows
    free = set(table._free.tolist())
    assert free.isdisjoint(live.tolist()) and free | set(live.tolist()) == set(range(2, keys.numel()))
    assert not table.weight[PAD_ROW].any()


streams = st.lists(st.lists(st.integers(0, 40), min_size=1, max_size=12), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(
    stream=streams,
    policy=st.sampled_from(["lfu", "lru", "ttl"]),
    min_count=st.sampled_from([1, 2]),
    max_rows=st.sampled_from([6, 16, 64]),
)
def test_distinct_admitted_keys_never_share_a_row(stream: list[list[int]], policy: str, min_count: int, max_rows: int) -> None:
    cfg = config(
        max_rows=max_rows,
        admission={"min_count": min_count},
        eviction={"policy": policy, "every_n_steps": 3, "ttl_ms": 4, "high_watermark": 0.8, "low_watermark": 0.5},
    )
    module = DynamicEmbedding(cfg)
    for t, batch in enumerate(stream):
        train_step(module, batch, now_ms=t)
        check_invariants(module.table)
        rows = rows_of(module.table, batch)
        for key, row in zip(batch, rows):
            if key == 0:
                assert row == PAD_ROW
            elif row != DEFAULT_ROW:
                assert module.table.row_keys[row] == key
        admitted = {k: r for k, r in zip(batch, rows) if r >= 2}
        assert len(set(admitted.values())) == len(admitted)


def test_rows_grow_until_max_rows_then_admissions_evict() -> None:
    module = DynamicEmbedding(config(initial_rows=2, max_rows=8, eviction={"policy": "lru"}))
    train_step(module, [1, 2, 3], now_ms=1)
    assert module.table.capacity == 4 and module.table.counters.grows == 1
    train_step(module, [4, 5, 6, 7, 8], now_ms=2)
    assert module.table.capacity == 8 and module.table.size == 8
    train_step(module, [9], now_ms=3)
    assert module.table.capacity == 8 and module.table.counters.evictions > 0
    assert 9 in live_keys(module.table) and module.table.size <= 8
    check_invariants(module.table)


def test_admission_waits_for_min_count_and_reads_the_zero_default() -> None:
    module = DynamicEmbedding(config(admission={"min_count": 3}))
    for _ in range(2):
        out = train_step(module, [11, 11 + 1])
        assert not out.any() and module.table.size == 0
        assert not module.table.weight[DEFAULT_ROW].any(), "gradient reached a row that does not exist"
    out = train_step(module, [11])
    assert module.table.size == 1 and module.table.counters.admissions == 1
    assert torch.equal(out, uniform_rows(torch.tensor([11]), 4, 0.05, 0))


def test_learned_default_row_trains_for_unadmitted_ids() -> None:
    module = DynamicEmbedding(config(default_row="learned", admission={"min_count": 5}))
    train_step(module, [7, 8])
    assert module.table.weight[DEFAULT_ROW].any() and module.table.size == 0
    assert not module.table.weight[PAD_ROW].any()


def test_padding_id_reads_zero_and_never_trains() -> None:
    module = DynamicEmbedding(config())
    for _ in range(3):
        out = train_step(module, [[0, 5], [5, 0]])
        assert not out[0, 0].any() and not out[1, 1].any() and out[0, 1].any()
    assert not module.table.weight[PAD_ROW].any() and module.table.size == 1


def test_scoring_never_admits_or_rescores() -> None:
    module = DynamicEmbedding(config(admission={"min_count": 2}))
    train_step(module, [1, 1, 2], now_ms=5)
    before = module.table.state_dict()
    module.eval()
    module(torch.tensor([2, 3, 3, 4]), now_ms=99)
    module.train()
    with torch.no_grad():
        module(torch.tensor([2, 3, 3, 4]), now_ms=99)
    after = module.table.state_dict()
    assert all(torch.equal(v, after[k]) if isinstance(v, torch.Tensor) else v == after[k] for k, v in before.items())


def evict_one_round(policy: str, seen: list[tuple[int, list[int]]]) -> set[int]:
    """Fill a 4-row table from (now_ms, ids) batches, then admit key 99; return survivors."""
    module = DynamicEmbedding(config(initial_rows=4, max_rows=4, eviction={"policy": policy, "low_watermark": 0.75}))
    for now_ms, ids in seen:
        train_step(module, ids, now_ms=now_ms)
    assert module.table.size == 4
    train_step(module, [99], now_ms=100)
    # Full table, one new key: free down to floor(0.75 * 4) = 3 rows after the insert.
    assert module.table.counters.evictions == 2
    return live_keys(module.table)


def test_lfu_evicts_the_least_frequent() -> None:
    # freq 1:5, 2:1, 3:3, 4:2 -- and the rare keys are the most recent, to tell LFU from LRU.
    seen = [(1, [1] * 5 + [3] * 3), (2, [4, 4]), (3, [2])]
    assert evict_one_round("lfu", seen) == {1, 3, 99}


def test_lru_evicts_the_least_recent() -> None:
    # The frequent keys are the oldest, to tell LRU from LFU.
    seen = [(10, [1] * 5), (20, [3] * 3), (30, [4]), (40, [2])]
    assert evict_one_round("lru", seen) == {2, 4, 99}


def test_rows_in_the_batch_are_never_evicted_to_admit_its_other_keys() -> None:
    module = DynamicEmbedding(config(initial_rows=4, max_rows=4, eviction={"policy": "lru"}))
    train_step(module, [1, 2, 3, 4], now_ms=1)
    before = module.table.embeddings(torch.tensor(rows_of(module.table, [1, 2, 3, 4])))
    out = train_step(module, [1, 2, 3, 4, 5], now_ms=2)
    assert live_keys(module.table) == {1, 2, 3, 4} and module.table.counters.rejections == 1
    assert torch.equal(out[:4], before) and not out[4].any()


def test_ttl_evicts_rows_unseen_for_ttl_on_the_periodic_pass() -> None:
    module = DynamicEmbedding(config(eviction={"policy": "ttl", "ttl_ms": 100, "every_n_steps": 2}))
    train_step(module, [1, 2], now_ms=0)
    train_step(module, [2, 3], now_ms=50)  # step 2: nothing is 100 ms old yet
    assert live_keys(module.table) == {1, 2, 3}
    train_step(module, [3], now_ms=120)
    train_step(module, [4], now_ms=90)  # step 4: late event; the clock stays at 120
    assert live_keys(module.table) == {2, 3, 4}  # key 1, last seen at 0 < 120 - 100, is gone
    assert module.table.counters.evictions == 1


def test_ids_must_be_int64_and_not_the_tombstone() -> None:
    table = EmbeddingTable(config())
    with pytest.raises(TypeError):
        table.lookup(torch.tensor([1, 2], dtype=torch.int32), train=True)
    with pytest.raises(ValueError, match="reserved"):
        table.lookup(torch.tensor([-(1 << 63)]), train=True)


def _through_safetensors(state: dict[str, Any]) -> dict[str, Any]:
    """What the checkpoint store does: tensors to safetensors, the rest to JSON."""
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    others = json.loads(json.dumps({k: v for k, v in state.items() if k not in tensors}))
    return safetensors.torch.load(safetensors.torch.save(tensors)) | others


def test_state_round_trip_is_bit_exact_and_training_continues_identically() -> None:
    cfg = config(
        initial_rows=4, max_rows=12, admission={"min_count": 2}, default_row="learned",
        eviction={"policy": "lru", "every_n_steps": 3}, optimizer={"kind": "adam", "lr": 0.01, "eps": 1e-8},
    )
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 30, (3, 5), generator=gen) for _ in range(16)]
    original = DynamicEmbedding(cfg)
    for t, ids in enumerate(batches[:8]):
        train_step(original, ids, now_ms=10 * t)
    assert original.table.counters.evictions > 0 and original.table.counters.grows > 0
    state = original.table.state_dict()
    restored = DynamicEmbedding(cfg)
    restored.table.load_state_dict(_through_safetensors(state))
    probe = torch.arange(0, 40)
    original.eval(), restored.eval()
    assert torch.equal(original(probe), restored(probe))
    original.train(), restored.train()
    for t, ids in enumerate(batches[8:], start=8):
        assert torch.equal(train_step(original, ids, now_ms=10 * t), train_step(restored, ids, now_ms=10 * t))
    a, b = original.table.state_dict(), restored.table.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k] for k, v in a.items())


def test_state_dict_is_a_copy() -> None:
    module = DynamicEmbedding(config())
    train_step(module, [1, 2])
    state = module.table.state_dict()
    state["weight"].zero_()
    state["row_keys"].zero_()
    assert module.table.weight[2:4].any() and module.table.size == 2


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.update(format_version=99), "format_version"),
        (lambda s: s.update(dim=8), "dim"),
        (lambda s: s.pop("slot.sum"), "optimizer slots"),
        (lambda s: s["row_keys"].__setitem__(3, int(s["row_keys"][2])), "unique"),
        (lambda s: s["weight"][PAD_ROW].fill_(1.0), "pad row"),
        (lambda s: s.update(freq=s["freq"][:-1]), "rows"),
    ],
)
def test_load_rejects_state_that_does_not_fit(mutate: Any, message: str) -> None:
    cfg = config(optimizer={"kind": "adagrad"})
    module = DynamicEmbedding(cfg)
    train_step(module, [1, 2, 3])
    state = module.table.state_dict()
    mutate(state)
    with pytest.raises(ValueError, match=message):
        EmbeddingTable(cfg).load_state_dict(state)


def test_metrics_are_plain_numbers() -> None:
    module = DynamicEmbedding(config(max_rows=10))
    train_step(module, [1, 2, 3, 3])
    table = module.table
    assert (table.size, table.load_factor, table.counters.lookups, table.counters.admissions) == (3, 0.3, 4, 3)
    assert 0 < table.hash_load_factor <= 0.5 and table.nbytes > table.weight.nbytes


def test_state_dict_holds_no_objects() -> None:
    module = DynamicEmbedding(config(admission={"min_count": 2}))
    train_step(module, [1, 1])
    for key, value in module.table.state_dict().items():
        assert isinstance(value, (torch.Tensor, int)), key
