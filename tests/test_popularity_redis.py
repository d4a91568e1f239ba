"""Stats snapshots in Redis (consumers/stats_store.py) and the joiner's Redis-backed popularity
(consumers/popularity.py: RedisPopularity), against a real Redis: the key layout round-trips,
a snapshot enters only through sync() and applies only once the joiner has passed its clock,
an unreachable Redis falls back to local counts and recovers, and the state replays the
same lookups whatever Redis holds later. The joiner's hot/cold rank-package splits and its
CTR priors then follow the global (Redis) statistics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from consumers.config import DecoderConfig, JoinerConfig, PopularityConfig, StatsConfig
from consumers.decode import EventDecoder
from consumers.joiner import LabelJoiner
from consumers.popularity import InProcessPopularity, RedisPopularity
from consumers.schema import Action, Slot, concat_batches
from consumers.state import flatten_state, states_equal, unflatten_state
from consumers.stats_state import PartialCounts
from consumers.stats_store import COLUMN, FIELDS, Priors, StatsKeys, StatsSnapshot, build_snapshot, read_snapshot, \
    write_snapshot
from consumers.testing import StreamSpec, encode_partitioned, synthetic_events
from streamtrain.services import EmbeddedRedis

pytestmark = pytest.mark.integration

PRIORS = Priors(ctr_strength=10.0, default_ctr=0.05, cvr_strength=5.0, default_cvr=0.1)
STATS = StatsConfig(bucket_ms=10_000, window_buckets=6, half_life_ms=60_000)
E, C = int(Action.EXPOSURE), int(Action.CLICK)


def snapshot_of(values_by_partition: dict[int, list[bytes]], until_ts: int | None = None) -> StatsSnapshot:
    """What the stats worker would hold after these messages (those with ts <= until_ts)."""
    decoder = EventDecoder(DecoderConfig(), (), ())
    counts = {"item": PartialCounts(STATS), "user": PartialCounts(STATS)}
    for partition, values in values_by_partition.items():
        ev = decoder.decode(values, [partition] * len(values), list(range(len(values)))).events
        keep = ev.ts <= (until_ts if until_ts is not None else ev.ts.max())
        for kind, ids in (("item", ev.item), ("user", ev.user)):
            counts[kind].apply(partition, ev.offset[keep], ids[keep], ev.etype[keep], ev.ts[keep])
    clock = max(c.max_clock for c in counts.values())  # type: ignore[type-var]
    return build_snapshot(counts["item"].merged(clock), counts["user"].merged(clock), PRIORS, {"note": "test"})


def _config(url: str, prefix: str, **kw: object) -> PopularityConfig:
    return PopularityConfig(backend="redis", redis_url=url, key_prefix=prefix, hot_quantile=0.5, ctr_prior_strength=10.0,
                            default_ctr=0.05, **kw)


def test_the_snapshot_layout_round_trips_and_the_pointer_moves_last(redis_url: str, unique_name: str) -> None:
    client, keys = redis.Redis.from_url(redis_url), StatsKeys(f"{unique_name}:")
    events = encode_partitioned(synthetic_events(StreamSpec(exposures=600, users=30, items=80, click_rate=0.2)), 2)
    first, second = snapshot_of(events, until_ts=synthetic_events(StreamSpec(exposures=300))[-1]["ts"]), snapshot_of(events)
    assert read_snapshot(client, keys) is None
    n1 = write_snapshot(client, keys, first, ttl_s=600, grace_s=30)
    got = read_snapshot(client, keys)
    assert got is not None and got.same_counts(first) and got.info["note"] == "test"
    some = int(first.items.ids[3])
    record = np.frombuffer(client.hget(keys.lookup(n1, "item"), str(some)), "<f4")  # the point-lookup form
    assert record.tobytes() == first.items.values[3].tobytes() and len(record) == len(FIELDS)
    assert 0 < client.ttl(keys.current) <= 600 and 0 < client.ttl(keys.lookup(n1, "user")) <= 600
    n2 = write_snapshot(client, keys, second, ttl_s=600, grace_s=30)
    assert n2 == n1 + 1 and read_snapshot(client, keys).same_counts(second)  # type: ignore[union-attr]
    assert 0 < client.ttl(keys.lookup(n1, "item")) <= 30 and 0 < client.ttl(keys.ids(n1, "item", 0)) <= 30
    # the definitions: rank 1 = most decayed exposures, quantile = share strictly below, Beta-prior rates
    items = second.items
    pop = items.column("exposures_decayed")
    top = int(np.argmax(pop))
    assert items.column("rank")[top] == 1 and items.column("quantile")[top] == np.float32((pop < pop[top]).mean())
    e, c, v = (items.values[:, COLUMN[f"{k}_decayed"]].astype(np.float64) for k in ("exposures", "clicks", "conversions"))
    ctr = c.sum() / e.sum()
    assert second.global_ctr == pytest.approx(ctr)
    assert np.allclose(items.column("ctr"), (c + 10 * ctr) / (e + 10), rtol=1e-5)
    assert np.allclose(items.column("cvr"), (v + 5 * second.global_cvr) / (c + 5), rtol=1e-5)


def test_a_snapshot_applies_at_the_first_boundary_after_the_joiner_passed_its_clock(
        redis_url: str, unique_name: str) -> None:
    client, prefix = redis.Redis.from_url(redis_url), f"{unique_name}:"
    snap = snapshot_of(encode_partitioned(synthetic_events(StreamSpec(exposures=300, click_rate=0.3)), 2))
    write_snapshot(client, StatsKeys(prefix), snap, ttl_s=600, grace_s=30)
    pop = RedisPopularity(_config(redis_url, prefix), client)
    items, users = snap.items.ids[:5], snap.users.ids[:5]
    local = InProcessPopularity(_config(redis_url, prefix))
    pop.sync()
    assert pop.counters["fetches"] == 1 and pop.source == "local"
    for ts in (snap.clock - 1, snap.clock):  # before the joiner has finalised an event at the clock: still local
        pop.observe(users[:1], items[:1], np.array([E]), np.array([ts]))
        local.observe(users[:1], items[:1], np.array([E]), np.array([ts]))
        pop.refresh()
        local.refresh()
        if ts < snap.clock:
            assert pop.source == "local"
            assert np.array_equal(pop.item_popularity(items), local.item_popularity(items))
    assert pop.source == "redis" and pop.counters["redis_refreshes"] == 1
    assert pop.item_popularity(items).tolist() == snap.items.column("exposures_decayed")[:5].astype(np.float64).tolist()
    user_prior, item_prior = pop.ctr_priors(np.array([users[0], 12345]), np.array([items[1], 67890]))
    assert user_prior.tolist() == [snap.users.column("ctr")[0], np.float32(snap.global_ctr)]
    assert item_prior.tolist() == [snap.items.column("ctr")[1], np.float32(snap.global_ctr)]
    positive = np.sort(snap.items.column("exposures_decayed")[snap.items.column("exposures_decayed") > 0])
    assert pop.hot_threshold() == float(positive[int(0.5 * (len(positive) - 1))])
    before = pop.state_dict()
    pop.sync()  # the same snapshot again: nothing staged, the state is unchanged
    assert states_equal(pop.state_dict(), before)


def test_redis_down_falls_back_to_local_counts_and_recovers(tmp_path: Path, unique_name: str) -> None:
    prefix = f"{unique_name}:"
    server = EmbeddedRedis(log_dir=tmp_path).start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
        snap = snapshot_of(encode_partitioned(synthetic_events(StreamSpec(exposures=200)), 2))
        write_snapshot(client, StatsKeys(prefix), snap, ttl_s=600, grace_s=30)
        pop = RedisPopularity(_config(server.url, prefix), client)
        pop.sync()
        pop.observe(snap.users.ids[:1], snap.items.ids[:1], np.array([E]), np.array([snap.clock]))
        pop.refresh()
        assert pop.source == "redis"
        server.stop()
        pop.sync()  # never raises
        assert pop.counters["fetch_errors"] == 1 and pop.source == "redis"  # takes effect at the next boundary
        pop.refresh()
        assert pop.source == "local" and pop.counters["source_redis"] == 0
        assert pop.item_popularity(snap.items.ids[:1]).tolist() == [1.0]  # the one exposure it counted itself
        server = EmbeddedRedis(port=server.port, log_dir=tmp_path).start()  # back, empty
        pop.sync()
        assert pop.counters["fetch_missing"] == 1 and pop.source == "local"  # up, but no stats worker yet
        write_snapshot(client, StatsKeys(prefix), snap, ttl_s=600, grace_s=30)  # the worker's next snapshot
        pop.sync()
        pop.refresh()
        assert pop.source == "redis" and pop.counters["fetches"] == 2
    finally:
        server.stop()


def test_the_state_replays_the_same_lookups_whatever_redis_holds_later(redis_url: str, unique_name: str) -> None:
    client, prefix = redis.Redis.from_url(redis_url), f"{unique_name}:"
    events = encode_partitioned(synthetic_events(StreamSpec(exposures=400, click_rate=0.3)), 2)
    first = snapshot_of(events, until_ts=synthetic_events(StreamSpec(exposures=200))[-1]["ts"])
    write_snapshot(client, StatsKeys(prefix), first, ttl_s=600, grace_s=30)
    pop = RedisPopularity(_config(redis_url, prefix), client)
    pop.sync()  # pending, not yet applied: the checkpoint holds it
    saved = pop.state_dict()
    write_snapshot(client, StatsKeys(prefix), snapshot_of(events), ttl_s=600, grace_s=30)  # Redis moves on
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    replay = RedisPopularity(_config(redis_url, prefix), dead)
    replay.load_state_dict(unflatten_state(*flatten_state(saved)))  # as a checkpoint stores it
    items, users = first.items.ids, first.users.ids
    for p in (pop, replay):
        p.observe(users[:3], items[:3], np.array([E, C, E]), np.full(3, first.clock + 5))
        p.refresh()
    assert pop.source == replay.source == "redis"
    assert np.array_equal(pop.item_popularity(items), replay.item_popularity(items))
    assert all(np.array_equal(a, b) for a, b in zip(pop.ctr_priors(users[:7], items[:7]), replay.ctr_priors(users[:7], items[:7])))
    assert states_equal(pop.state_dict(), replay.state_dict())


def test_joiner_hot_cold_splits_and_priors_follow_redis_popularity(redis_url: str, unique_name: str) -> None:
    """The joiner reads partition 0 only; the stats cover both partitions. After the
    snapshot applies, every hot slot of a rank package holds an item hot by the global
    statistics and every cold slot one that is not, and each sample's item CTR prior is the
    snapshot's — where the local counts would have split differently."""
    client, prefix = redis.Redis.from_url(redis_url), f"{unique_name}:"
    spec = StreamSpec(exposures=6000, users=40, items=120, click_rate=0.25, request_gap_ms=400)
    events = synthetic_events(spec)
    by_partition = encode_partitioned(events, 2)
    cutoff = events[len(events) // 5]["ts"]
    snap = snapshot_of(by_partition, until_ts=cutoff)
    write_snapshot(client, StatsKeys(prefix), snap, ttl_s=600, grace_s=30)
    cfg = JoinerConfig(click_window_ms=30_000, convert_window_ms=60_000, allowed_lateness_ms=2_000,
                       stats_refresh_ms=20_000, history_len=8, num_random_negatives=2)
    decoder = EventDecoder(DecoderConfig(), cfg.sparse_features, cfg.dense_features)
    redis_pop, local_pop = RedisPopularity(_config(redis_url, prefix), client), InProcessPopularity(_config(redis_url, prefix))
    redis_pop.sync()
    joined = []
    for pop in (redis_pop, local_pop):
        joiner = LabelJoiner(cfg, pop)
        joiner.assign([0])
        values = by_partition[0]
        batches = []
        for start in range(0, len(values), 200):
            chunk = values[start:start + 200]
            joiner.ingest(decoder.decode(chunk, [0] * len(chunk), list(range(start, start + len(chunk)))).events)
            batches.append(joiner.advance().samples)
        batches.append(joiner.flush().samples)
        joined.append(concat_batches(batches))
    with_redis, with_local = joined
    late = (with_redis["hist_ts"].min(axis=1, where=with_redis["hist_actions"] > 0, initial=2**62)
            > snap.clock + 2 * cfg.stats_refresh_ms) & (with_redis["hist_len"] > 0)  # every history event after it applied
    assert late.sum() > 200
    threshold = redis_pop.hot_threshold()
    table = dict(zip(snap.items.ids.tolist(), snap.items.column("exposures_decayed").tolist()))
    hot_of = np.vectorize(lambda item: table.get(item, 0.0) > threshold)
    package = with_redis["rank_package"][late]
    for slot, hot in ((Slot.HOT_CLICK, True), (Slot.HOT_EXPOSURE, True), (Slot.COLD_CLICK, False),
                      (Slot.COLD_EXPOSURE, False)):
        filled = package[:, slot][package[:, slot] != 0]
        assert len(filled) > 20 and (hot_of(filled) == hot).all(), f"slot {slot.name} does not follow Redis"
    assert not np.array_equal(with_redis["rank_package"], with_local["rank_package"]), "local counts split the same"
    ctr = dict(zip(snap.items.ids.tolist(), snap.items.column("ctr").tolist()))
    assert with_redis["item_ctr_prior"][late].tolist() == [np.float32(ctr.get(i, snap.global_ctr))
                                                           for i in with_redis["item"][late].tolist()]


def test_a_worker_running_ahead_never_keeps_every_snapshot_waiting(redis_url: str, unique_name: str) -> None:
    """Fetches keep bringing snapshots newer than what the joiner has finalised: the newest
    one it has passed still applies at the next boundary, the newer one keeps waiting."""
    client, prefix = redis.Redis.from_url(redis_url), f"{unique_name}:"
    events = encode_partitioned(synthetic_events(StreamSpec(exposures=600, click_rate=0.3)), 2)
    older = snapshot_of(events, until_ts=synthetic_events(StreamSpec(exposures=300))[-1]["ts"])
    newer = snapshot_of(events)
    assert older.clock < newer.clock
    pop = RedisPopularity(_config(redis_url, prefix), client)
    write_snapshot(client, StatsKeys(prefix), older, ttl_s=600, grace_s=30)
    pop.sync()
    write_snapshot(client, StatsKeys(prefix), newer, ttl_s=600, grace_s=30)
    pop.sync()  # before the joiner reached the older one's clock
    assert [p["clock"] for p in pop.state_dict()["pending"].values()] == [older.clock, newer.clock]
    pop.observe(older.users.ids[:1], older.items.ids[:1], np.array([E]), np.array([older.clock]))
    pop.refresh()
    assert pop.source == "redis" and pop.state_dict()["active"]["clock"] == older.clock
    assert [p["clock"] for p in pop.state_dict()["pending"].values()] == [newer.clock]
    pop.observe(older.users.ids[:1], older.items.ids[:1], np.array([E]), np.array([newer.clock]))
    pop.refresh()
    assert pop.state_dict()["active"]["clock"] == newer.clock and not pop.state_dict()["pending"]
