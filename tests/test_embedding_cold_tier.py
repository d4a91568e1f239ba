"""The versioned cold tier: read-at-step semantics, garbage collection, and a table that is
killed and restored from checkpoints ending bit-identical to an uninterrupted one -- on the
in-memory reference and on the real session Redis."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import torch

from streamtrain.embedding import ColdTier, EmbeddingTableConfig, MemoryColdTier, RedisColdTier
from streamtrain.embedding.cold_tier import garbage, version_at
from streamtrain.modules.dynamic_embedding import DynamicEmbedding

TierFactory = Callable[[str], ColdTier]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def new_tier(request: pytest.FixtureRequest, unique_name: str) -> Iterator[TierFactory]:
    """name -> a fresh, empty tier (Redis: one key prefix per name and test)."""
    if request.param == "memory":
        yield lambda name: MemoryColdTier()
        return
    client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
    yield lambda name: RedisColdTier(client, key_prefix=f"{unique_name}:{name}:")
    client.close()


def stored_versions(tier: ColdTier) -> dict[int, list[int]]:
    """key -> its stored versions, sorted (read from the storage, not through the contract)."""
    if isinstance(tier, MemoryColdTier):
        return {k: sorted(v) for k, v in tier.versions.items() if v}
    assert isinstance(tier, RedisColdTier)
    out = {}
    for name in tier.client.scan_iter(match=f"{tier.key_prefix}*"):
        suffix = name.decode()[len(tier.key_prefix) :]
        if suffix != "gc":
            out[int(suffix)] = sorted(int(f) for f in tier.client.hkeys(name))
    return out


# ---------------------------------------------------------------------------- the contract
def test_a_read_returns_the_newest_version_at_or_before_its_step_and_deletes_nothing(new_tier: TierFactory) -> None:
    tier = new_tier("t")
    tier.put([7, 8], [b"7@3", b"8@3"], step=3)
    tier.put([7], [b"7@5"], step=5)
    tier.put([7], [b"7@9"], step=9)
    for step, want in [(2, None), (3, b"7@3"), (4, b"7@3"), (5, b"7@5"), (8, b"7@5"), (9, b"7@9"), (99, b"7@9")]:
        assert tier.get([7, 8, 1], step) == [want, None if step < 3 else b"8@3", None]
    tier.put([7], [b"7@5 again"], step=5)  # a replay rewriting a version replaces only that version
    assert tier.get([7], 6) == [b"7@5 again"] and tier.get([7], 9) == [b"7@9"]
    assert stored_versions(tier) == {7: [3, 5, 9], 8: [3]}


def test_garbage_is_what_no_read_from_the_retained_step_can_return() -> None:
    assert version_at([3, 5, 9], 4) == 3 and version_at([3, 5, 9], 2) is None
    assert garbage([3, 5, 9], 2) == [] and garbage([3, 5, 9], 5) == [3] and garbage([9, 3, 5], 100) == [3, 5]


def random_ops(rng: random.Random, n: int) -> Iterator[tuple[str, Any]]:
    """Puts mostly at a rising step, sometimes back at older steps (a replay rewriting them),
    and retain_from at a step that rises with the puts, as the daemon's would."""
    step = 0
    for _ in range(n):
        step += rng.randrange(3)
        if rng.random() < 0.15:
            yield "retain_from", max(0, step - rng.randrange(8))
        else:
            keys = rng.sample(range(1, 25), rng.randrange(1, 6))
            at = step if rng.random() < 0.8 else max(0, step - rng.randrange(10))
            yield "put", (keys, [f"{k}@{at}#{rng.random()}".encode() for k in keys], at)


def last_version(tier: MemoryColdTier) -> int:
    return max((max(v) for v in tier.versions.values() if v), default=0)


@pytest.mark.parametrize("seed", range(5))
def test_retain_from_keeps_every_read_at_or_after_its_step_and_one_version_before(seed: int) -> None:
    tier = MemoryColdTier()
    for op, arg in random_ops(random.Random(seed), 300):
        if op == "put":
            tier.put(*arg)
            continue
        keys, horizon = list(range(1, 25)), last_version(tier) + 2
        before = {t: tier.get(keys, t) for t in range(arg, horizon)}
        tier.retain_from(arg)
        assert {t: tier.get(keys, t) for t in range(arg, horizon)} == before
        assert all(sum(v <= arg for v in versions) <= 1 for versions in tier.versions.values())


@pytest.mark.integration
@pytest.mark.parametrize("seed", range(3))
def test_redis_tier_matches_the_reference(redis_url: str, unique_name: str, seed: int) -> None:
    client = redis.Redis.from_url(redis_url)
    tier, reference = RedisColdTier(client, key_prefix=f"{unique_name}:", chunk=7), MemoryColdTier()
    keys = list(range(1, 25))

    def same_reads(steps: range) -> bool:
        return all(tier.get(keys, t) == reference.get(keys, t) for t in steps)

    for op, arg in random_ops(random.Random(seed), 300):
        if op == "put":
            tier.put(*arg)
            reference.put(*arg)
            assert same_reads(range(arg[2], arg[2] + 1))
            continue
        tier.retain_from(arg)
        reference.retain_from(arg)
        # GC is exact: Redis keeps what the reference keeps, and nothing is left to visit.
        assert stored_versions(tier) == stored_versions(reference)
        assert client.zrangebyscore(f"{unique_name}:gc", "-inf", arg) == []
        assert same_reads(range(arg, last_version(reference) + 2))
    assert same_reads(range(last_version(reference) + 2))
    # Every key with garbage-to-be is in the gc set at a score no later than it becomes garbage.
    scores = {int(m): s for m, s in client.zrange(f"{unique_name}:gc", 0, -1, withscores=True)}
    for key, versions in stored_versions(tier).items():
        if len(versions) > 1:
            assert scores[key] <= versions[1]
    assert tier.errors == 0
    client.close()


# -------------------------------------------------------------- kill and restore a table
CONFIG = EmbeddingTableConfig(
    name="items",
    dim=4,
    initial_rows=4,
    max_rows=8,  # ids 1..30 over 8 rows: rows spill and come back nearly every step
    admission={"min_count": 2, "sketch_width": 1024, "halve_every_n_steps": 16},
    eviction={"policy": "lfu", "every_n_steps": 3, "high_watermark": 0.9, "low_watermark": 0.6, "lfu_halve_every_n_steps": 8},
    optimizer={"kind": "adam", "lr": 0.05, "eps": 1e-8},
)
STEPS, EVERY, KEEP = 60, 10, 2  # checkpoint every 10 steps, retain the newest 2


def train_step(module: DynamicEmbedding, t: int, *, killed_midway: bool = False) -> None:
    """Step t: two training lookups (room evictions can fall between them), then the update.
    ``killed_midway`` stops after the first lookup, as a SIGKILL inside the step would."""
    gen = torch.Generator().manual_seed(t)
    first = module(torch.randint(1, 31, (5,), generator=gen), now_ms=t)
    if killed_midway:
        return
    second = module(torch.randint(1, 31, (3,), generator=gen), now_ms=t)
    (first.sum() + second.pow(2).sum()).backward()
    module.apply_gradients()


def run(tier: ColdTier, kills: dict[int, tuple[str, bool]] | None = None) -> DynamicEmbedding:
    """Train STEPS steps like the daemon: checkpoint (state_dict) every EVERY steps, keep the
    newest KEEP and call ``retain_from`` with the oldest one's table step. ``kills``: step ->
    (which retained checkpoint the restart loads: "latest", or "oldest" as if the newer one
    were damaged; whether the kill lands mid-step)."""
    module, retained, t, kills = DynamicEmbedding(CONFIG, cold_tier=tier), [], 0, dict(kills or {})
    while t < STEPS:
        if t in kills:
            which, midway = kills.pop(t)
            if midway:
                train_step(module, t, killed_midway=True)
            if which == "oldest":
                retained = retained[:1]
            restored = retained[-1]
            dying = module.table.counters  # the killed run spilled and read back after its checkpoint
            assert dying.spills > restored["counters.spills"] and dying.cold_hits > restored["counters.cold_hits"]
            module = DynamicEmbedding(CONFIG, cold_tier=tier)  # a new process, the same Redis
            module.table.load_state_dict(restored)
            t = module.table.step
            continue
        train_step(module, t)
        t += 1
        if t % EVERY == 0:
            retained = [*retained, module.table.state_dict()][-KEEP:]
            tier.retain_from(retained[0]["step"])
    return module


class LatestSpill:
    """What a read must return when nothing is replayed: each key's latest spill (the old,
    unversioned tier, deleting on read)."""

    def __init__(self) -> None:
        self.records: dict[int, bytes] = {}

    def put(self, keys: list[int], records: list[bytes], step: int) -> None:
        self.records.update(zip(keys, records, strict=True))

    def get(self, keys: list[int], step: int) -> list[bytes | None]:
        return [self.records.pop(k, None) for k in keys]

    def retain_from(self, step: int) -> None:
        pass


def assert_same_state(want: dict[str, Any], got: dict[str, Any]) -> None:
    assert sorted(want) == sorted(got)
    for name, value in want.items():
        same = torch.equal(value, got[name]) and value.dtype == got[name].dtype if torch.is_tensor(value) else value == got[name]
        assert same, f"{name} differs"


def test_without_kills_a_readmitted_key_gets_its_latest_spill(new_tier: TierFactory) -> None:
    versioned, latest = DynamicEmbedding(CONFIG, cold_tier=new_tier("v")), DynamicEmbedding(CONFIG, cold_tier=LatestSpill())
    for t in range(STEPS):
        train_step(versioned, t)
        train_step(latest, t)
    assert_same_state(latest.table.state_dict(), versioned.table.state_dict())
    assert versioned.table.counters.cold_hits > 50


def test_restored_tables_end_bit_identical_to_an_uninterrupted_run(new_tier: TierFactory) -> None:
    reference = DynamicEmbedding(CONFIG, cold_tier=new_tier("reference"))
    for t in range(STEPS):
        train_step(reference, t)  # no checkpoints, no garbage collection
    tier = new_tier("killed")
    # Killed after step 26 (back to 20), inside step 44 (back to 30, the oldest retained:
    # GC must have kept what it needs), after step 57 (back to 50).
    kills = {27: ("latest", False), 44: ("oldest", True), 57: ("latest", False)}
    survivor = run(tier, kills)

    assert_same_state(reference.table.state_dict(), survivor.table.state_dict())
    assert reference.table.counters.cold_hits > 50, "the scenario must read rows back from the tier"
    keys = list(range(1, 31))  # and the tier answers every future read the same
    assert survivor.table.cold_tier.get(keys, STEPS) == reference.table.cold_tier.get(keys, STEPS)


def test_garbage_collection_bounds_what_a_long_run_keeps(new_tier: TierFactory) -> None:
    tier, ungc = new_tier("gc"), new_tier("no-gc")
    run(tier)
    reference = DynamicEmbedding(CONFIG, cold_tier=ungc)
    for t in range(STEPS):
        train_step(reference, t)  # the same steps, never collected
    oldest = STEPS - (KEEP - 1) * EVERY  # the last retain_from step
    versions, everything = stored_versions(tier), stored_versions(ungc)
    # One version at or before the retained step per key, and what was spilled since.
    assert all(sum(v <= oldest for v in vs) <= 1 for vs in versions.values())
    spilled_since = sum(sum(v > oldest for v in vs) for vs in everything.values())
    assert sum(map(len, versions.values())) <= len(versions) + spilled_since
    assert sum(map(len, everything.values())) > 3 * sum(map(len, versions.values())), "GC must have dropped most versions"
    # Nothing a read from the oldest retained checkpoint on can return was dropped.
    keys = list(range(1, 31))
    assert all(tier.get(keys, t) == ungc.get(keys, t) for t in range(oldest, STEPS + 1))
