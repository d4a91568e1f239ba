"""Published embeddings in Redis (streamtrain/runtime/serving.py): real Trainer, real published
Parquet files, real Redis. A reader that follows the pointer gets exactly the rows of the
version it points to — after deltas, tombstones, rollbacks, a Redis restart — never a mix."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import orjson
import pytest
import redis
import torch
import yaml

from model_fixtures import SyntheticWorld
from streamtrain.embedding import EmbeddingTableConfig
from streamtrain.embedding.delta import read_parquet
from streamtrain.modules.config import ModelConfig
from streamtrain.runtime.publisher import PublishedVersion, Publisher, verify_version
from streamtrain.runtime.releases import table_file, version_files
from streamtrain.runtime.serving import ServingPush, read_current, table_names
from streamtrain.services import EmbeddedRedis
from streamtrain.trainer import Trainer

pytestmark = pytest.mark.integration


def _trainer() -> Trainer:
    """Tiny model; the item table holds 96 rows of ~300 items, so training evicts (tombstones)."""
    model = ModelConfig(embedding_dim=8, max_history_len=8, hstu={"num_layers": 1, "qk_dim": 4, "v_dim": 4},
                        esmm={"hidden": (8,)}, retrieval={"dim": 8})
    small = {"initial_rows": 96, "max_rows": 96, "admission": {"min_count": 1, "sketch_width": 256}}
    tables = {n: EmbeddingTableConfig(name=n, dim=8, **(small if n == "item" else {"initial_rows": 512}))
              for n in ("item", "user", "sparse")}
    return Trainer(model, tables, learning_rate=1e-2, seed=0, device=torch.device("cpu"))


class _Run:
    """Train a few steps, publish a version: what the daemon's releases do, minus the cadence."""

    def __init__(self, root: Path) -> None:
        self.trainer = _trainer()
        self.publisher = Publisher(root, keep_versions=10)
        self.world, self.rng = SyntheticWorld(n_items=300), np.random.default_rng(0)

    def publish(self, steps: int = 3) -> PublishedVersion:
        for _ in range(steps):
            self.trainer.step(self.world.batch(self.rng, 64, history=8, negatives=2))
        return self.publisher.publish(version_files(self.trainer), {"checkpoint": f"ckpt-{self.trainer.steps:012d}",
                                                                    "samples": self.trainer.samples})


def _tables_on_disk(version: PublishedVersion) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for name in table_names(version):
        snap = read_parquet(version.path / table_file(name))
        order = np.argsort(snap.keys)
        out[name] = (snap.keys[order], snap.rows[order])
    return out


def _same(seen: dict[str, tuple[np.ndarray, np.ndarray]], on_disk: dict[str, tuple[np.ndarray, np.ndarray]]) -> bool:
    return seen.keys() == on_disk.keys() and all(
        np.array_equal(seen[n][0], on_disk[n][0]) and seen[n][1].tobytes() == on_disk[n][1].tobytes() for n in seen)


def _assert_serves(client: redis.Redis, prefix: str, version: PublishedVersion) -> dict:
    got = read_current(client, prefix)
    assert got is not None
    name, manifest, tables = got
    assert name == version.name
    assert _same(tables, _tables_on_disk(version)), f"Redis rows of {name} differ from its Parquet tables"
    assert Path(manifest["dense"]) == (version.path / "dense.safetensors").resolve() and Path(manifest["dense"]).is_file()
    assert Path(manifest["index"]).is_file() and manifest["checkpoint"] == version.manifest["checkpoint"]
    for table in manifest["tables"]:
        default = client.get(f"{prefix}serve:{name}:emb:{table}:default")
        assert default == read_parquet(version.path / table_file(table)).default_row.astype("<f4").tobytes()
    return manifest


def test_two_versions_and_a_rollback_serve_exactly_the_version_pointed_to(
        redis_url: str, unique_name: str, tmp_path: Path) -> None:
    client, prefix = redis.Redis.from_url(redis_url), f"{unique_name}:"
    run, push = _Run(tmp_path / "published"), ServingPush(redis.Redis.from_url(redis_url), prefix, keep_versions=3)
    v1 = run.publish()
    assert push.sync(run.publisher)
    first = _assert_serves(client, prefix, v1)
    assert first["pushed"] == "full" and first["base"] is None

    v2 = run.publish(steps=1)
    before, after = _tables_on_disk(v1), _tables_on_disk(v2)
    dropped = {n: np.setdiff1d(before[n][0], after[n][0]) for n in after}
    assert len(dropped["item"]) > 0, "the test needs evicted items (tombstones) between the versions"
    unchanged = sum(int(np.isin(after[n][0], before[n][0]).sum()) for n in after)  # upper bound: ids in both
    written_before = push.counters.rows_written
    assert push.sync(run.publisher)
    second = _assert_serves(client, prefix, v2)
    assert second["pushed"] == "delta" and second["base"] == v1.name
    held = sum(len(after[n][0]) for n in after)
    written = push.counters.rows_written - written_before
    assert written < held, f"a delta writes the changed rows and tombstones only ({written} of {held} rows)"
    assert unchanged > 0 and written >= sum(len(d) for d in dropped.values())
    assert push.versions() == [v1.name, v2.name]

    run.publisher.rollback(v1.name)  # what `streamtrain publish rollback` and the gate's rollback do on disk
    assert push.sync(run.publisher)
    _assert_serves(client, prefix, v1)
    assert push.counters.pushes == 2, "v1 was still complete in Redis: a rollback is a pointer move"


def test_a_reader_racing_pushes_and_rollbacks_never_sees_a_mix(redis_url: str, unique_name: str, tmp_path: Path) -> None:
    prefix = f"{unique_name}:"
    run, push = _Run(tmp_path / "published"), ServingPush(redis.Redis.from_url(redis_url), prefix, keep_versions=2,
                                                          expire_grace_s=30)
    versions = [run.publish()]
    push.sync(run.publisher)
    on_disk = {versions[0].name: _tables_on_disk(versions[0])}
    seen: list[str] = []
    mixed: list[str] = []
    done = threading.Event()

    def reader() -> None:
        client = redis.Redis.from_url(redis_url)
        while not done.is_set():
            name, _, tables = read_current(client, prefix)  # type: ignore[misc]
            seen.append(name)
            if not _same(tables, on_disk[name]):
                mixed.append(name)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(4):
            version = run.publish(steps=2)
            on_disk[version.name] = _tables_on_disk(version)  # known before the pointer can name it
            versions.append(version)
            assert push.sync(run.publisher)
            if i % 2:
                run.publisher.rollback(versions[-2].name)
                assert push.sync(run.publisher)
    finally:
        done.set()
        thread.join(timeout=30)
    assert not mixed, f"reads that matched no single version: {mixed}"
    assert len(set(seen)) >= 3, f"the reader saw too few versions to prove anything: {sorted(set(seen))}"


def test_old_versions_expire_after_keep_versions_but_not_the_one_pointed_to(
        redis_url: str, unique_name: str, tmp_path: Path) -> None:
    client, prefix = redis.Redis.from_url(redis_url), f"{unique_name}:"
    run, push = _Run(tmp_path / "published"), ServingPush(client, prefix, keep_versions=2, expire_grace_s=50)
    names = []
    for _ in range(4):
        names.append(run.publish(steps=1).name)
        assert push.sync(run.publisher)
    assert push.versions() == names[-2:]
    for old in names[:2]:
        assert 0 < client.ttl(f"{prefix}serve:{old}:manifest") <= 50  # readers mid-lookup finish first
        assert 0 < client.ttl(f"{prefix}serve:{old}:emb:item") <= 50
    assert client.ttl(f"{prefix}serve:{names[-1]}:emb:item") == -1  # complete versions do not expire
    run.publisher.rollback(names[1])  # fell out, still within its grace period: kept again, not rewritten
    assert push.sync(run.publisher)
    _assert_serves(client, prefix, run.publisher.version(names[1]))  # type: ignore[arg-type]
    assert push.counters.pushes == 4 and client.ttl(f"{prefix}serve:{names[1]}:emb:item") == -1
    client.delete(f"{prefix}serve:{names[0]}:manifest")  # as if its grace period had passed
    run.publisher.rollback(names[0])  # gone from Redis: pushed again
    assert push.sync(run.publisher)
    _assert_serves(client, prefix, run.publisher.version(names[0]))  # type: ignore[arg-type]
    assert push.counters.pushes == 5


def test_a_redis_outage_loses_no_version_and_the_next_publish_repopulates(tmp_path: Path, unique_name: str) -> None:
    prefix = f"{unique_name}:"
    server = EmbeddedRedis(log_dir=tmp_path).start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
        run, push = _Run(tmp_path / "published"), ServingPush(client, prefix)
        run.publish()
        assert push.sync(run.publisher)
        server.stop()
        v2 = run.publish()
        assert not push.sync(run.publisher)  # counted, logged, never raised
        assert push.counters.failures == 1 and "ConnectionError" in (push.counters.last_error or "")
        assert run.publisher.current().name == v2.name and not verify_version(v2)  # type: ignore[union-attr]
        server = EmbeddedRedis(port=server.port, log_dir=tmp_path).start()  # restarted empty (no persistence)
        v3 = run.publish()
        assert push.sync(run.publisher)
        manifest = _assert_serves(client, prefix, v3)
        assert manifest["pushed"] == "full" and push.counters.full_pushes == 2
    finally:
        server.stop()


def test_publish_rollback_command_moves_the_redis_pointer(redis_url: str, unique_name: str, tmp_path: Path) -> None:
    client, prefix = redis.Redis.from_url(redis_url), f"{unique_name}:"
    run, push = _Run(tmp_path / "published"), ServingPush(client, prefix)
    v1 = run.publish()
    run.publish()
    assert push.sync(run.publisher)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path), "redis": {"url": redis_url, "key_prefix": prefix}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAIN_")}
    out = subprocess.run([sys.executable, "-m", "streamtrain", "publish", "rollback", v1.name, "--config", str(config),
                          "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert orjson.loads(out.stdout.splitlines()[-1]) == {"current": v1.name, "redis_current": v1.name}
    _assert_serves(client, prefix, v1)
    listed = subprocess.run([sys.executable, "-m", "streamtrain", "publish", "list", "--config", str(config), "--json"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    doc = orjson.loads(listed.stdout.splitlines()[-1])
    assert doc["redis"]["current"] == v1.name and doc["redis"]["versions"] == [v.name for v in run.publisher.versions()]
