"""Scale-out building blocks, each against its single-process counterpart (no broker):
joiners sharing a topic, a sharded table, the distributed trainer, and the regrouping of
table and joiner states for another number of workers. Multi-rank tests run real
processes over gloo, joined the way ``streamtrain run --workers`` joins them."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from checkpoints import state_differences
from consumers.config import DecoderConfig, JoinerConfig, PopularityConfig
from consumers.decode import EventDecoder
from consumers.joiner import LabelJoiner
from consumers.pipeline import IngestPipeline
from consumers.popularity import InProcessPopularity
from consumers.reshard import regroup
from consumers.schema import SAMPLE_FIELDS, SampleBatch, concat_batches, empty_batch
from consumers.testing import ListDlqSink, ListSource, StreamSpec, encode_partitioned, synthetic_events
from consumers.topic import SoleJoiner, TopicExchange
from model_fixtures import SyntheticWorld
from streamtrain.config import build_config
from streamtrain.distributed.comm import Comm
from streamtrain.distributed.group import Membership, connect, disconnect
from streamtrain.distributed.launcher import LocalRendezvous, rank_environment
from streamtrain.distributed.layout import placement
from streamtrain.distributed.replicas import RowReplicas, row_slice
from streamtrain.distributed.samples import SampleExchange
from streamtrain.distributed.sharded_embedding import ShardedDynamicEmbedding, owner_of
from streamtrain.distributed.state import pack_state, unpack_state
from streamtrain.distributed.topic import TorchTopicExchange
from streamtrain.embedding import EmbeddingTable, EmbeddingTableConfig
from streamtrain.embedding.regroup import regroup_table_states
from streamtrain.modules.dynamic_embedding import DynamicEmbedding
from streamtrain.trainer import build_trainer

PARTITIONS = 4
JOINER = JoinerConfig(click_window_ms=30_000, convert_window_ms=60_000, allowed_lateness_ms=2_000,
                      stats_refresh_ms=20_000, history_len=8, num_random_negatives=3, item_pool_size=64)
TABLE = EmbeddingTableConfig(name="t", dim=4, initial_rows=64,
                             admission={"min_count": 2, "sketch_width": 64, "sketch_depth": 2})


# ------------------------------------------------------------------ running ranks
def _rank_main(rank: int, world: int, port: int, out: Path, job: Callable[[Comm, Path], dict[str, Any]]) -> None:
    os.environ.update(rank_environment({}, rank, world, port, 0))
    torch.set_num_threads(1)
    comm = connect(Membership.from_env(), torch.device("cpu"), timeout_s=120)
    try:
        (out / f"rank{rank}.state").write_bytes(pack_state(job(comm, out)))
    finally:
        disconnect()


def run_ranks(world: int, job: Callable[[Comm, Path], dict[str, Any]], tmp_path: Path) -> list[dict[str, Any]]:
    """``job(comm, tmp_path)`` on ``world`` real processes; their returned states, rank order."""
    rendezvous = LocalRendezvous(world, timeout_s=120)
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_rank_main, args=(r, world, rendezvous.port, tmp_path, job)) for r in range(world)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=300)
        assert [p.exitcode for p in procs] == [0] * world
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        rendezvous.close()
    return [unpack_state((tmp_path / f"rank{r}.state").read_bytes()) for r in range(world)]


# ------------------------------------------------------------------ joiners sharing a topic
def _stream(policy: str) -> dict[int, list[bytes]]:
    spec = StreamSpec(exposures=1200, users=40, items=300, request_gap_ms=300, click_rate=0.25, convert_rate=0.4,
                      click_delay_ms=(0, 40_000), convert_delay_ms=(0, 80_000), seed=3)
    return encode_partitioned(synthetic_events(spec), PARTITIONS)


def _pipeline(partitions: dict[int, list[bytes]], policy: str, exchange: TopicExchange) -> IngestPipeline:
    cfg = JOINER.model_copy(update={"policy": policy})
    decoder = EventDecoder(DecoderConfig(), cfg.sparse_features, cfg.dense_features)
    joiner = LabelJoiner(cfg, InProcessPopularity(PopularityConfig(max_items=50)), exchange)
    return IngestPipeline(ListSource(partitions, end_of_input=True), decoder, joiner, ListDlqSink())


def _lock_step(pipeline: IngestPipeline, comm: Comm, turns: int | None = None) -> SampleBatch:
    """Run a rank's pipeline like a worker does (ingest alone, agree, advance together,
    gather every rank's samples) to the end of input or for ``turns`` turns."""
    exchange = SampleExchange(comm, JOINER.history_len, JOINER.num_random_negatives, 3, 1)
    samples: list[SampleBatch] = []
    turn = 0
    while turns is None or turn < turns:
        turn += 1
        pipeline.ingest(37 + 11 * comm.rank)  # ranks read at different paces
        joiner = pipeline.joiner
        floor = joiner.partition_floor()
        low = comm.all_min([2**63 - 1 if floor is None else floor, int(pipeline.end_of_input)])
        ended = bool(low[1])
        emission = joiner.flush() if ended else joiner.advance_to(None if low[0] == 2**63 - 1 else low[0])
        samples.append(exchange.gather(pipeline.release(emission)))
        if ended:
            break
    return concat_batches(samples)


def _own_logs(policy: str, comm: Comm) -> dict[int, list[bytes]]:
    logs = _stream(policy)
    return {p: logs[p] for p in placement(range(PARTITIONS), comm.world)[comm.rank]}


def _shared_topic_job(policy: str, comm: Comm, out: Path) -> dict[str, Any]:
    pipeline = _pipeline(_own_logs(policy, comm), policy, TorchTopicExchange(comm))
    samples = _lock_step(pipeline, comm)
    joiner = pipeline.joiner
    return {"samples": samples, "popularity": joiner.popularity.state_dict(),
            "item_pool": joiner.item_pool.state_dict(), "watermark": joiner.watermark}


@pytest.mark.parametrize("policy", ["wait", "emit_then_correct"])
def test_joiners_sharing_a_topic_emit_exactly_what_one_joiner_emits(policy: str, tmp_path: Path) -> None:
    sole = _pipeline(_stream(policy), policy, SoleJoiner())
    batches = []
    while not sole.end_of_input:
        batches += sole.poll(50)
    expected = concat_batches(batches)
    assert len(expected["sample_id"]) > 1000 and expected["click"].sum() > 100
    if policy == "emit_then_correct":
        assert expected["is_correction"].sum() > 10
    for got in run_ranks(2, partial(_shared_topic_job, policy), tmp_path):
        # Every field of every sample, in order: features from the shared popularity and
        # item pool included. And the topic-wide state is the sole joiner's, bit for bit.
        assert not state_differences(expected, got["samples"])
        assert not state_differences(sole.joiner.popularity.state_dict(), got["popularity"])
        assert not state_differences(sole.joiner.item_pool.state_dict(), got["item_pool"])


def _sole_samples(pipeline: IngestPipeline) -> SampleBatch:
    batches = [empty_batch(JOINER.history_len, JOINER.num_random_negatives, 3, 1)]
    while not pipeline.end_of_input:
        batches += pipeline.poll(50)
    return concat_batches(batches)


def _first_half_job(comm: Comm, out: Path) -> dict[str, Any]:
    """Two ranks from the start, for a few turns: their samples and their cut."""
    pipeline = _pipeline(_own_logs("wait", comm), "wait", TorchTopicExchange(comm))
    samples = _lock_step(pipeline, comm, turns=12)
    positions = {str(p): o for p, o in pipeline.positions()["events"].items()}
    return {"samples": samples, "pipeline": pipeline.state_dict(), "positions": positions}


def _second_half_job(comm: Comm, out: Path) -> dict[str, Any]:
    """Two ranks from a state regrouped for them (written by the test)."""
    pipeline = _pipeline(_own_logs("wait", comm), "wait", TorchTopicExchange(comm))
    cut = unpack_state((out / f"cut{comm.rank}.state").read_bytes())
    pipeline.load_state_dict(cut["pipeline"])
    pipeline.seek({"events": {int(p): int(o) for p, o in cut["positions"].items()}})
    return {"samples": _lock_step(pipeline, comm)}


def test_joiner_states_regrouped_for_another_number_of_ranks_continue_the_same_stream(tmp_path: Path) -> None:
    """2 ranks -> 1 and 1 -> 2 ranks, cut mid-stream (pending samples, staged events,
    histories): the samples before the cut and after it are the sole joiner's stream."""
    expected = _sole_samples(_pipeline(_stream("wait"), "wait", SoleJoiner()))
    two = placement(range(PARTITIONS), 2)

    first = run_ranks(2, _first_half_job, tmp_path)
    assert first[0]["samples"]["sample_id"].size < expected["sample_id"].size // 2  # a cut mid-stream
    assert all(f["pipeline"]["joiner"]["pending"]["columns"]["sample_id"].size for f in first)
    sole = _pipeline(_stream("wait"), "wait", SoleJoiner())
    [merged] = regroup([f["pipeline"] for f in first], two, [list(range(PARTITIONS))], 3, 1)
    sole.load_state_dict(merged)
    sole.seek({"events": {int(p): int(o) for f in first for p, o in f["positions"].items()}})
    rest = _sole_samples(sole)
    assert not state_differences(expected, concat_batches([first[0]["samples"], rest]))

    sole = _pipeline(_stream("wait"), "wait", SoleJoiner())
    head = [empty_batch(JOINER.history_len, JOINER.num_random_negatives, 3, 1)]
    for _ in range(25):
        head += sole.poll(50)
    for rank, state in enumerate(regroup([sole.state_dict()], [list(range(PARTITIONS))], two, 3, 1)):
        positions = {str(p): o for p, o in sole.positions()["events"].items() if p in two[rank]}
        (tmp_path / f"cut{rank}.state").write_bytes(pack_state({"pipeline": state, "positions": positions}))
    second = run_ranks(2, _second_half_job, tmp_path)
    assert not state_differences(expected, concat_batches([*head, second[0]["samples"]]))


# ------------------------------------------------------------------ a sharded table
def _id_batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 40, (9, 5), generator=g) for _ in range(8)]


def _train(emb: DynamicEmbedding, rows: Callable[[int], tuple[int, int]]) -> None:
    emb.train()
    weights = torch.arange(1.0, TABLE.dim + 1)
    for step, ids in enumerate(_id_batches()):
        lo, hi = rows(ids.shape[0])
        (emb(ids[lo:hi], now_ms=1000 * step) * weights).sum().backward()
        emb.apply_gradients()


def _sharded_table_job(comm: Comm, out: Path) -> dict[str, Any]:
    emb = ShardedDynamicEmbedding(TABLE, comm=comm)
    _train(emb, lambda n: row_slice(n, comm.rank, comm.world))
    return {"table": emb.table.state_dict()}


def per_key(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Everything a table holds per key, in key order (row indices dropped)."""
    live = (state["row_keys"] != 0).nonzero().squeeze(1)
    rows = live[torch.argsort(state["row_keys"][live])]
    names = ("row_keys", "weight", "freq", "last_seen_ms", "touched", *sorted(k for k in state if k.startswith("slot.")))
    return {name: state[name][rows] for name in names}


def merged_per_key(states: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    keyed = [per_key(s) for s in states]
    merged = {name: torch.cat([k[name] for k in keyed]) for name in keyed[0]}
    order = torch.argsort(merged["row_keys"])
    return {name: column[order] for name, column in merged.items()}


def test_sharded_table_admits_counts_and_updates_every_key_like_one_table(tmp_path: Path) -> None:
    one = DynamicEmbedding(TABLE)
    _train(one, lambda n: (0, n))
    shards = [s["table"] for s in run_ranks(2, _sharded_table_job, tmp_path)]
    for rank, shard in enumerate(shards):
        keys = shard["row_keys"][shard["row_keys"] != 0]
        assert keys.numel() and (owner_of(keys, 2) == rank).all()
        # The admission sketch is replicated: each shard holds the one table's sketch.
        assert torch.equal(shard["sketch.counts"], one.table.sketch.counts)
    expected, got = per_key(one.table.state_dict()), merged_per_key(shards)
    for name in ("row_keys", "freq", "last_seen_ms", "touched"):
        assert torch.equal(got[name], expected[name]), name
    for name in ("weight", "slot.sum"):  # per-rank partial gradient sums: float association only
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-6)
    assert sum(s["counters.lookups"] for s in shards) == one.table.counters.lookups
    assert sum(s["counters.admissions"] for s in shards) == one.table.counters.admissions


# ------------------------------------------------------------------ the distributed trainer, one rank
def test_one_rank_trains_bit_for_bit_like_the_single_process_trainer() -> None:
    torch.set_num_threads(1)
    cfg = build_config({"trainer": {"batch_size": 32}, "joiner": {"history_len": 8},
                        "model": {"embedding_dim": 8, "max_history_len": 8, "hstu": {"num_layers": 1, "qk_dim": 4, "v_dim": 4},
                                  "esmm": {"hidden": [16]}, "retrieval": {"dim": 8}},
                        "embeddings": {n: {"initial_rows": 256, "admission": {"min_count": 2, "sketch_width": 256}}
                                       for n in ("item", "user", "sparse")}})
    world, rng = SyntheticWorld(), np.random.default_rng(0)
    batches = [world.batch(rng, 32, history=8, negatives=4) for _ in range(4)]
    plain = build_trainer(cfg, torch.device("cpu"))
    comm = Comm()
    scaled = build_trainer(cfg, torch.device("cpu"), embedding=partial(ShardedDynamicEmbedding, comm=comm),
                           replicas=RowReplicas(comm))
    for batch in batches:
        a, b = plain.step(batch), scaled.step(batch)
        assert np.array_equal(a.predictions.p_ctr, b.predictions.p_ctr) and a.losses == b.losses
    assert not state_differences(plain.state_dict(), scaled.state_dict())


def test_row_slices_cover_the_batch_once() -> None:
    for rows in (0, 1, 5, 64, 65):
        for world in (1, 2, 3, 7):
            slices = [row_slice(rows, r, world) for r in range(world)]
            assert slices[0][0] == 0 and slices[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(slices, slices[1:]))
            assert max(hi - lo for lo, hi in slices) - min(hi - lo for lo, hi in slices) <= 1


# ------------------------------------------------------------------ regrouping for another number of workers
def test_regrouped_tables_keep_every_key_and_read_the_same_rows() -> None:
    one = DynamicEmbedding(TABLE)
    _train(one, lambda n: (0, n))
    original = one.table.state_dict()
    states = [original]
    for workers in (3, 2, 1):  # 1 -> 3 -> 2 -> 1 workers
        states = regroup_table_states(states, lambda keys, w=workers: owner_of(keys, w), workers, TABLE.initial_rows)
        assert len(states) == workers
        got = merged_per_key(states)
        for name, column in per_key(original).items():
            assert torch.equal(got[name], column), (workers, name)
        for part, state in enumerate(states):
            keys = state["row_keys"][state["row_keys"] != 0]
            assert (owner_of(keys, workers) == part).all()
            assert torch.equal(state["sketch.counts"], original["sketch.counts"])
            table = EmbeddingTable(TABLE)
            table.load_state_dict(state)  # a valid table state
            reference = EmbeddingTable(TABLE)
            reference.load_state_dict(original)
            hit, ref_hit = table.lookup(keys, train=False), reference.lookup(keys, train=False)
            assert torch.equal(table.embeddings(hit.rows)[hit.inverse], reference.embeddings(ref_hit.rows)[ref_hit.inverse])
        assert sum(s["counters.admissions"] for s in states) == original["counters.admissions"]
