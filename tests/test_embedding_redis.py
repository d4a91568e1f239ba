"""The Redis cold tier and the Redis delta push, against the real session Redis server."""

from __future__ import annotations

import numpy as np
import pytest
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from streamtrain.embedding import EmbeddingTableConfig, RedisColdTier, push_to_redis
from streamtrain.modules.dynamic_embedding import DynamicEmbedding

pytestmark = pytest.mark.integration


def small_table(tier: RedisColdTier) -> DynamicEmbedding:
    cfg = EmbeddingTableConfig(
        name="items",
        dim=4,
        initial_rows=4,
        max_rows=4,
        admission={"min_count": 1},
        eviction={"policy": "lru", "every_n_steps": 0, "low_watermark": 0.75},
        optimizer={"kind": "adam", "lr": 0.05, "eps": 1e-8},
    )
    return DynamicEmbedding(cfg, cold_tier=tier)


def step(module: DynamicEmbedding, ids: list[int], now_ms: int) -> None:
    module(torch.tensor(ids), now_ms=now_ms).pow(2).sum().backward()
    module.apply_gradients()


def row_state(module: DynamicEmbedding, key: int) -> dict[str, torch.Tensor]:
    table = module.table
    row = int(table._map.lookup(torch.tensor([key]))[0])
    assert row >= 0, f"key {key} has no row"
    return {"weight": table.weight[row].clone(), "freq": table.freq[row].clone()} | {
        name: slot[row].clone() for name, slot in table.slots.items()
    }


def test_evicted_rows_spill_and_come_back_on_readmission(redis_url: str, unique_name: str) -> None:
    client = redis.Redis.from_url(redis_url)
    module = small_table(RedisColdTier(client, key_prefix=f"{unique_name}:items:"))
    for t, ids in enumerate([[1, 2], [3, 4], [1, 3], [1, 3]]):
        step(module, ids, now_ms=t)
    saved = {key: row_state(module, key) for key in (2, 4)}  # the least recent two
    step(module, [5], now_ms=10)  # full: evicts 2 and 4 down to 3 rows after the insert

    counters = module.table.counters
    assert (counters.evictions, counters.spills, counters.cold_misses) == (2, 2, 5)
    prefix = f"{unique_name}:items:"
    assert sorted(client.keys(f"{unique_name}:*")) == [f"{prefix}{k}".encode() for k in (2, 4, "gc")]
    spilled = {key: client.hgetall(f"{prefix}{key}") for key in (2, 4)}
    assert all(list(versions) == [b"4"] for versions in spilled.values()), "versioned by the table step that spilled"

    module.eval()
    assert not module(torch.tensor([2])).any(), "an evicted key reads the default row until readmitted"
    module.train()
    module(torch.tensor([2]), now_ms=11)  # readmission, no gradient yet
    back = row_state(module, 2)
    assert back.pop("freq") == saved[2].pop("freq") + 1  # restored count plus this sighting
    assert all(torch.equal(back[name], saved[2][name]) for name in saved[2])
    assert (counters.cold_hits, counters.admissions) == (1, 6)
    assert client.hgetall(f"{prefix}2") == spilled[2], "reads delete nothing: a replay must find the row again"
    module.apply_gradients()


def test_unreachable_redis_fails_open(unique_name: str, refused_port: int) -> None:
    client = redis.Redis(host="127.0.0.1", port=refused_port, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))
    tier = RedisColdTier(client, key_prefix=f"{unique_name}:")
    module = small_table(tier)
    for t, ids in enumerate([[1, 2, 3, 4], [5]]):
        step(module, ids, now_ms=t)
    assert module.table.counters.evictions == 2 and module.table.size == 3
    tier.retain_from(1)
    assert tier.errors >= 3  # the failed reads, the failed spill and the failed GC, none of them fatal


def test_delta_push_writes_rows_and_deletes_tombstones(redis_url: str, unique_name: str) -> None:
    client = redis.Redis.from_url(redis_url)
    module = small_table(RedisColdTier(client, key_prefix=f"{unique_name}:cold:"))
    hash_key = f"{unique_name}:serving:items"
    step(module, [1, 2, 3, 4], now_ms=0)
    push_to_redis(module.table.take_delta(), client, hash_key)
    assert sorted(int(k) for k in client.hkeys(hash_key)) == [1, 2, 3, 4]

    step(module, [3, 4], now_ms=1)
    step(module, [5], now_ms=2)  # evicts 1 and 2
    delta = module.table.take_delta()
    push_to_redis(delta, client, hash_key)
    stored = {int(k): np.frombuffer(v, "<f4") for k, v in client.hgetall(hash_key).items()}
    assert sorted(stored) == [3, 4, 5]
    for key, row in zip(delta.keys.tolist(), delta.rows):
        assert np.array_equal(stored[key], row)
    assert np.array_equal(np.frombuffer(client.get(f"{hash_key}:default"), "<f4"), np.zeros(4, np.float32))
