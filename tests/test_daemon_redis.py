"""The daemon with Redis-backed popularity and the serving push, as real processes against
the embedded broker and real Redis servers.

* With the statistics in Redis holding still, a run SIGKILLed several times ends in exactly
  the state of an uninterrupted run (every value of every component, as in
  tests/test_daemon_recovery.py), and the popularity it used was Redis's; serving follows
  CURRENT with the published rows.
* Redis killed mid-run: the daemon falls back to local counts (never crashes), a SIGKILL
  during the outage loses and duplicates nothing, and it returns to Redis's statistics
  when they are back. Its recovery stays exact: restoring a checkpoint and replaying to the
  next one trains exactly what the run trained — with Redis dead, or holding other
  statistics by then.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import redis
from confluent_kafka import Consumer, Producer, TopicPartition

from checkpoints import CheckpointStore, ledger_chain, state_differences
from consumers.config import DecoderConfig, StatsConfig
from consumers.decode import EventDecoder
from consumers.markers import is_end_of_input, produce_end_of_input
from consumers.stats_state import PartialCounts
from consumers.stats_store import Priors, StatsKeys, build_snapshot, write_snapshot
from daemon_harness import final_state, produce_log, start_daemon, write_config
from streamtrain.embedding.delta import read_parquet
from streamtrain.runtime.publisher import Publisher
from streamtrain.runtime.releases import table_file
from streamtrain.runtime.serving import read_current, table_names
from streamtrain.services import EmbeddedRedis
from streamtrain.services.topics import create_topics

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPOSURES = 2500
NOT_REPLAYED = {
    "monitors.gate.last_transition.wall_time": "wall-clock stamp for alert timestamps, never used in decisions",
    "ledger": "ids trained since the parent checkpoint, whose parents differ between runs: the chain is compared",
}
# Event-time refresh boundaries every 2 s: the log spans ~160 s of event time.
JOINER = {"stats_refresh_ms": 2000}
# Samples leave 15 s of event time after their exposure, so each part of a log fed part by
# part trains something (late conversions are dead-lettered: not what this test is about).
SHORT_WINDOWS = {**JOINER, "click_window_ms": 15_000, "convert_window_ms": 15_000}


def read_topic(bootstrap: str, topic: str) -> list[tuple[int, bytes | None, bytes | None, Any]]:
    """Every message of ``topic``, (partition, key, value, headers), in the order the
    simulator produced them (its arrival timestamps; offset order within a partition)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"read-{topic}", "enable.auto.commit": False})
    parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
    out: list[Any] = []
    for p in sorted(parts):
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        consumer.assign([TopicPartition(topic, p, 0)])
        got: list[Any] = []
        while True:
            message = consumer.poll(5.0)
            if message is None:
                break
            if message.error() is None and message.partition() == p:
                got.append((message.timestamp()[1], p, message.key(), message.value(), message.headers()))
                if is_end_of_input(message.value(), message.headers()):
                    break
        assert len(got) >= high, f"read {len(got)} of {high} messages of partition {p}"
        out += got
    consumer.close()
    out.sort(key=lambda m: m[0])  # stable: offset order kept within a partition
    return [m[1:] for m in out]


def snapshot_until(messages: list[tuple[int, bytes | None, bytes | None, Any]], fraction: float) -> Any:
    """The stats worker's snapshot (same code) over the first ``fraction`` of the log's
    messages: statistics that hold still while the daemons run."""
    decoder = EventDecoder(DecoderConfig(), (), ())
    counts = {"item": PartialCounts(StatsConfig()), "user": PartialCounts(StatsConfig())}
    head = messages[:int(fraction * len(messages))]
    for p in sorted({m[0] for m in head}):
        values = [v for q, _, v, h in head if q == p and not is_end_of_input(v, h)]
        ev = decoder.decode(values, [p] * len(values), list(range(len(values)))).events
        for kind, ids in (("item", ev.item), ("user", ev.user)):
            counts[kind].apply(p, ev.offset, ids, ev.etype, ev.ts)
    clock = max(c.max_clock for c in counts.values())  # type: ignore[type-var]
    return build_snapshot(counts["item"].merged(clock), counts["user"].merged(clock), Priors(20.0, 0.05, 20.0, 0.1))


def popularity_states(run_dir: Path, seen: dict[str, Any] | None = None) -> list[tuple[str, int, dict[str, Any]]]:
    """(checkpoint, samples, popularity state) of every retained checkpoint, oldest first;
    ``seen`` caches what was read before (checkpoints never change once written)."""
    seen = {} if seen is None else seen
    if not (run_dir / "checkpoints" / "LATEST").exists():
        return []
    with CheckpointStore(run_dir / "checkpoints", readonly=True) as store:
        for status in store.list_checkpoints():
            if status.name not in seen and status.manifest is not None:
                ckpt = store.load(status.name, components=["pipeline"])
                seen[status.name] = (status.name, int(status.manifest.extra["samples"]),
                                     ckpt.components["pipeline"]["joiner"]["popularity"])
    return [seen[name] for name in sorted(seen)]


def run_to_end(config: Path, log: Path, *args: str) -> None:
    proc = start_daemon(config, *args, log_path=log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def assert_exactly_once(run_dir: Path, exposures: int) -> None:
    ids = ledger_chain(run_dir / "checkpoints").sample_ids()
    assert len(ids) == exposures and len(np.unique(ids)) == exposures, "a sample trained twice or lost"


@pytest.fixture(scope="module")
def produced(kafka_bootstrap: str) -> dict[str, Any]:
    topic = f"redis-pop-{time.time_ns()}"
    log = produce_log(kafka_bootstrap, topic, mark_end=True, seed=17, exposures=EXPOSURES, users=300, items=800)
    return {**log, "topic": topic, "messages": read_topic(kafka_bootstrap, topic)}


def _config(path: Path, bootstrap: str, topic: str, run_dir: Path, redis_url: str, prefix: str, **extra: Any) -> Path:
    return write_config(path, bootstrap, topic, run_dir, redis={"url": redis_url, "key_prefix": prefix},
                        popularity={"backend": "redis", **extra.pop("popularity", {})},
                        joiner=extra.pop("joiner", JOINER), **extra)


def test_sigkilled_runs_with_redis_popularity_end_exactly_as_uninterrupted(
        kafka_bootstrap: str, redis_url: str, produced: dict[str, Any], unique_name: str, tmp_path: Path) -> None:
    prefix, topic = f"{unique_name}:", produced["topic"]
    client = redis.Redis.from_url(redis_url)
    statistics = snapshot_until(produced["messages"], 0.3)
    for namespace in (prefix, f"{prefix}ref:"):  # one per run: each run's serving keys are its own
        write_snapshot(client, StatsKeys(namespace), statistics, ttl_s=3600, grace_s=60)
    extra = {"popularity": {"refresh_s": 3600.0}, "publishing": {"every_samples": 1024}}
    reference = tmp_path / "reference"
    run_to_end(_config(tmp_path / "ref.yaml", kafka_bootstrap, topic, reference, redis_url, f"{prefix}ref:", **extra),
               tmp_path / "ref.log")

    crashed = tmp_path / "crashed"
    config = _config(tmp_path / "c.yaml", kafka_bootstrap, topic, crashed, redis_url, prefix, **extra)
    rng = random.Random(7)
    kills = 0
    for _ in range(3):
        proc = start_daemon(config, log_path=tmp_path / "crashed.log")
        if _kill_after_a_new_checkpoint(proc, crashed / "checkpoints", rng.uniform(0.0, 0.3)):
            kills += 1
        proc.wait(timeout=60)
    assert kills >= 2
    run_to_end(config, tmp_path / "crashed.log")

    ref, got = final_state(reference), final_state(crashed)
    differences = state_differences(ref.components, got.components, NOT_REPLAYED)
    assert not differences, "state differs from the uninterrupted run:\n" + "\n".join(differences[:40])
    assert_exactly_once(crashed, produced["exposures"])
    popularity = got.components["pipeline"]["joiner"]["popularity"]
    assert popularity["active"] is not None, "the runs never used the Redis statistics"
    current = Publisher(crashed / "published").current()
    assert current is not None and current.number >= 2
    name, manifest, tables = read_current(client, prefix)  # type: ignore[misc]
    assert name == current.name and manifest["pushed"] in ("delta", "full")
    for table in table_names(current):
        snap = read_parquet(current.path / table_file(table))
        order = np.argsort(snap.keys)
        assert np.array_equal(tables[table][0], snap.keys[order]) and np.array_equal(tables[table][1], snap.rows[order])


def _kill_after_a_new_checkpoint(proc: subprocess.Popen[bytes], root: Path, delay: float) -> bool:
    known = set(root.glob("ckpt-*")) if root.exists() else set()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if root.exists() and set(root.glob("ckpt-*")) - known:
            time.sleep(delay)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                return True
            return False
        time.sleep(0.005)
    return False


class _Feeder:
    """Re-produce a log to another topic part by part (same partitions, same order, markers
    last), so that services can fail between parts. Arrival timing never changes what the
    daemon computes."""

    def __init__(self, bootstrap: str, topic: str, messages: list[Any]) -> None:
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self.topic, self.messages = topic, [m for m in messages if not is_end_of_input(m[2], m[3])]
        self.partitions = sorted({m[0] for m in messages})
        self.sent = 0

    def up_to(self, fraction: float) -> None:
        stop = int(fraction * len(self.messages))
        for partition, key, value, _ in self.messages[self.sent:stop]:
            self.producer.produce(self.topic, key=key, value=value, partition=partition)
        self.sent = max(self.sent, stop)
        if fraction >= 1.0:
            produce_end_of_input(self.producer, self.topic, self.partitions)
        assert self.producer.flush(30) == 0

    def until(self, happened: Callable[[], bool], limit: float, proc: subprocess.Popen[bytes], log: Path) -> None:
        """Feed 2 % more at a time until ``happened()`` (a checkpoint the test waits for:
        checkpoints follow training steps, which follow the input)."""
        fraction = self.sent / len(self.messages)
        while not happened():
            assert proc.poll() is None, log.read_text()[-3000:]
            assert fraction < limit, f"not by {limit:.0%} of the log:\n{log.read_text()[-2000:]}"
            fraction = min(limit, fraction + 0.02)
            self.up_to(fraction)
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and not happened():
                time.sleep(0.2)


def _checkpoint_on(run_dir: Path, redis_mode: bool, after: int = 0) -> Callable[[], int | None]:
    """Samples of the first checkpoint past ``after`` samples whose popularity answers from
    Redis (``redis_mode``) or from local counts; None while there is none."""
    seen: dict[str, Any] = {}

    def found() -> int | None:
        for _, samples, state in popularity_states(run_dir, seen):
            if samples > after and (state["active"] is not None) == redis_mode:
                return samples
        return None

    return found


def _assert_metrics_show_the_fallback(run_dir: Path) -> None:
    """The live /metrics endpoint, found as an operator finds it: the failed fetches and the
    local source are visible, and the exposition passes promtool."""
    url = orjson.loads((run_dir / "endpoints.json").read_bytes())["metrics"]
    deadline = time.monotonic() + 30
    while True:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in body.splitlines()
                  if line.startswith("streamtrain_popularity") or line.startswith("streamtrain_serving")}
        if values.get('streamtrain_popularity_fetches_total{result="error"}', 0) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert values['streamtrain_popularity_fetches_total{result="error"}'] >= 1, values
    assert values['streamtrain_popularity_fetches_total{result="ok"}'] >= 1, values
    assert values["streamtrain_popularity_source_redis"] == 0, values
    assert values['streamtrain_popularity_refreshes_total{source="redis"}'] >= 1, values
    assert "streamtrain_serving_failures_total" in values, values
    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=body.encode(), capture_output=True)
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def _new_checkpoint(run_dir: Path) -> Callable[[], bool]:
    known = set((run_dir / "checkpoints").glob("ckpt-*"))
    return lambda: bool(set((run_dir / "checkpoints").glob("ckpt-*")) - known)


def test_redis_killed_mid_run_degrades_to_local_counts_recovers_and_replays_exactly(
        kafka_bootstrap: str, produced: dict[str, Any], unique_name: str, tmp_path: Path) -> None:
    prefix, topic = f"{unique_name}:", unique_name
    create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    statistics = snapshot_until(produced["messages"], 0.2)
    server = EmbeddedRedis(log_dir=tmp_path).start()
    run_dir, log = tmp_path / "run", tmp_path / "run.log"
    config = _config(tmp_path / "c.yaml", kafka_bootstrap, topic, run_dir, server.url, prefix,
                     popularity={"refresh_s": 0.5}, checkpoints={"keep_last": 500}, joiner=SHORT_WINDOWS)
    proc = None
    try:
        client = redis.Redis.from_url(server.url)
        write_snapshot(client, StatsKeys(prefix), statistics, ttl_s=3600, grace_s=60)  # as the stats worker would
        feeder = _Feeder(kafka_bootstrap, topic, produced["messages"])
        proc = start_daemon(config, log_path=log)
        on_redis = _checkpoint_on(run_dir, redis_mode=True)
        feeder.until(lambda: on_redis() is not None, 0.6, proc, log)
        server.stop()  # Redis dies: the next sync fails, the next boundary answers from local counts
        fell_back = _checkpoint_on(run_dir, redis_mode=False, after=on_redis() or 0)
        feeder.until(lambda: fell_back() is not None, 0.75, proc, log)
        _assert_metrics_show_the_fallback(run_dir)
        proc.send_signal(signal.SIGKILL)  # ... and the daemon dies during the outage
        proc.wait()
        proc = start_daemon(config, log_path=log)
        server = EmbeddedRedis(port=server.port, log_dir=tmp_path).start()  # back, empty
        feeder.until(_new_checkpoint(run_dir), 0.85, proc, log)  # it synced with an empty Redis: still local
        write_snapshot(client, StatsKeys(prefix), statistics, ttl_s=3600, grace_s=60)  # the worker's next snapshot
        back = _checkpoint_on(run_dir, redis_mode=True, after=fell_back() or 0)
        feeder.until(lambda: back() is not None, 1.0, proc, log)
        feeder.up_to(1.0)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        server.stop()
    assert_exactly_once(run_dir, produced["exposures"])
    text = log.read_text()
    assert "cannot read stats from Redis" in text and "no stats snapshot under" in text
    modes = [state["active"] is not None for _, _, state in popularity_states(run_dir)]
    first_local = modes.index(False, modes.index(True))
    assert True in modes[first_local:], f"never back on Redis's statistics: {modes}"  # (the feeder waited for it)

    # Exact recovery: a checkpoint on local counts (the outage) and one on Redis's statistics
    # (after it), each replayed from its predecessor with Redis dead / holding other numbers.
    states = popularity_states(run_dir)
    outage = next(i for i, (_, samples, st) in enumerate(states)
                  if samples >= (fell_back() or 0) and st["active"] is None and i > 0)
    back = max(i for i, (_, _, st) in enumerate(states) if st["active"] is not None)
    other = EmbeddedRedis(log_dir=tmp_path).start()
    try:
        write_snapshot(redis.Redis.from_url(other.url), StatsKeys(prefix), snapshot_until(produced["messages"], 0.9),
                       ttl_s=3600, grace_s=60)
        for index, url in ((outage, other.url), (back, "redis://127.0.0.1:1/0")):
            _assert_replays(run_dir, states[index - 1][0], states[index][0], states[index][1], tmp_path / f"r{index}",
                            kafka_bootstrap, topic, url, prefix)
    finally:
        other.stop()


def _assert_replays(run_dir: Path, start: str, target: str, samples: int, where: Path, bootstrap: str, topic: str,
                    redis_url: str, prefix: str) -> None:
    """Restore ``start`` (in a copy of the run without what came after it), train to
    ``samples`` and compare with ``target`` everything a training step determines: the
    trainer (so every sample trained since ``start``, priors and rank packages included),
    monitors and gate, releases, the ledger. (What the pipeline had *consumed* by then
    depends on how input arrived, here all at once: compared at the end of a log instead,
    as in the first test.)"""
    shutil.copytree(run_dir, where)
    for later in (where / "checkpoints").glob("ckpt-*"):
        if later.name > start:
            shutil.rmtree(later)
    (where / "checkpoints" / "LATEST").write_text(start + "\n")
    config = _config(where / "replay.yaml", bootstrap, topic, where, redis_url, prefix,
                     popularity={"refresh_s": 3600.0}, checkpoints={"keep_last": 500}, joiner=SHORT_WINDOWS)
    run_to_end(config, where / "replay.log", "--from", start, "--stop-after-samples", str(samples))
    with CheckpointStore(run_dir / "checkpoints", readonly=True) as store:
        expected = store.load(target)
    got = final_state(where)
    assert got.components["trainer"]["samples"] == samples
    stepped = ("trainer", "monitors", "releases", "ledger")
    differences = state_differences({k: expected.components[k] for k in stepped},
                                    {k: got.components[k] for k in stepped},
                                    {"monitors.gate.last_transition.wall_time": "wall-clock stamp for alerts"})
    assert not differences, f"replay of {start} -> {target} differs:\n" + "\n".join(differences[:40])
