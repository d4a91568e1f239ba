"""`streamtrain stats`, the faust-streaming worker, as a real process against the embedded
broker and a real Redis: after a simulated stream Redis holds the counts and priors computed
directly from the produced events; a SIGKILLed worker restores its tables from the changelog
and ends exact; a Redis restart is repopulated at the next snapshot; nothing listens beyond
loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import yaml
from confluent_kafka import Consumer, Producer, TopicPartition

from consumers.config import DecoderConfig
from consumers.decode import EventDecoder
from consumers.markers import produce_end_of_input
from consumers.schema import hash_id
from consumers.stats_store import COLUMN, StatsKeys, StatsSnapshot, read_snapshot
from streamtrain.services import EmbeddedRedis
from streamtrain.services.topics import create_topics
from streamtrain.simulator import SimulatorConfig, run_simulation

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PARTITIONS = 2
STATS = {"bucket_ms": 60_000, "window_buckets": 10, "half_life_ms": 600_000, "snapshot_every_s": 1.0,
         "take_within_s": 0.1}
PRIORS = {"ctr_prior_strength": 20.0, "default_ctr": 0.05}
_TYPES = {1: 0, 2: 1, 3: 2}


class _ListSink:
    def __init__(self) -> None:
        self.messages: list[tuple[bytes, bytes]] = []

    def send(self, event: Any) -> None:
        self.messages.append((event.key, event.value))

    def end_of_input(self) -> None:
        return None

    def close(self) -> None:
        return None


def simulated(exposures: int, seed: int) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value) of a simulated stream with some malformed messages; one
    user's events share a partition, chosen here (never by a partitioner)."""
    sink = _ListSink()
    run_simulation(SimulatorConfig(exposures=exposures, users=150, items=400, seed=seed, bad_fraction=0.02,
                                   convert_delay_median_s=60.0, max_convert_delay_s=300.0), sink)
    return [(hash_id(key.decode(errors="replace")) % PARTITIONS, key, value) for key, value in sink.messages]


def produce(bootstrap: str, topic: str, messages: list[tuple[int, bytes, bytes]], end: bool = False) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for partition, key, value in messages:
        producer.produce(topic, key=key, value=value, partition=partition)
    if end:  # end-of-input markers are not events: not counted, not skipped
        produce_end_of_input(producer, topic, range(PARTITIONS))
    assert producer.flush(30) == 0


def reference(messages: list[tuple[int, bytes, bytes]]) -> tuple[int, dict[str, dict[int, np.ndarray]], int]:
    """The definitions of consumers/stats_state.py computed the slow, obvious way:
    (clock, kind -> id -> [3 windowed counts, 3 decayed counts], bad messages)."""
    decoder = EventDecoder(DecoderConfig(), (), ())
    events, bad = [], 0
    for partition, key, value in messages:
        decoded = decoder.decode([value], [partition], [0], [key])
        bad += len(decoded.rejections)
        ev = decoded.events
        events += zip(ev.ts.tolist(), ev.etype.tolist(), ev.item.tolist(), ev.user.tolist())
    clock = max(ts for ts, *_ in events)
    out: dict[str, dict[int, np.ndarray]] = {"item": defaultdict(lambda: np.zeros(6)), "user": defaultdict(lambda: np.zeros(6))}
    for ts, etype, item, user in events:
        for kind, ident in (("item", item), ("user", user)):
            row = out[kind][ident]
            if clock // STATS["bucket_ms"] - ts // STATS["bucket_ms"] < STATS["window_buckets"]:
                row[_TYPES[etype]] += 1
            row[3 + _TYPES[etype]] += 2.0 ** (-(clock - ts) / STATS["half_life_ms"])
    return clock, out, bad


def assert_matches(snap: StatsSnapshot, messages: list[tuple[int, bytes, bytes]], one_process: bool = True) -> None:
    clock, expected, bad = reference(messages)
    assert snap.clock == clock
    if one_process:  # bad input is counted by the process (like every Prometheus counter), not kept in the tables
        assert sum(int(v) for v in snap.info["skipped"].values()) == bad > 0  # type: ignore[union-attr]
    items = expected["item"]
    exposures = np.array([v[3] for v in items.values()])
    clicks, conversions = np.array([v[4] for v in items.values()]), np.array([v[5] for v in items.values()])
    ctr, cvr = clicks.sum() / exposures.sum(), conversions.sum() / clicks.sum()
    assert snap.global_ctr == pytest.approx(ctr, rel=1e-9) and snap.global_cvr == pytest.approx(cvr, rel=1e-9)
    for kind, table in (("item", snap.items), ("user", snap.users)):
        want = expected[kind]
        assert sorted(want) == table.ids.tolist(), f"{kind} ids differ"
        rows = np.stack([want[i] for i in table.ids.tolist()])
        got = table.values.astype(np.float64)
        assert np.array_equal(got[:, 0:3], rows[:, 0:3]), f"{kind} windowed counts differ"
        assert np.allclose(got[:, 3:6], rows[:, 3:6], rtol=2e-7, atol=0), f"{kind} decayed counts differ"
        e, c, v = rows[:, 3], rows[:, 4], rows[:, 5]
        assert np.allclose(got[:, COLUMN["ctr"]], (c + 20 * ctr) / (e + 20), rtol=2e-7)
        assert np.allclose(got[:, COLUMN["cvr"]], (v + 20 * cvr) / (c + 20), rtol=2e-7)
        ordered = np.sort(e)
        tie = np.isclose(ordered[1:], ordered[:-1], rtol=1e-9, atol=0)  # float noise may order near-ties either way
        clear = ~np.isin(e, np.concatenate([ordered[1:][tie], ordered[:-1][tie]]))
        rank = 1 + len(e) - np.searchsorted(ordered, e, side="right")
        assert np.array_equal(got[clear, COLUMN["rank"]], rank[clear]), f"{kind} ranks differ"
        assert np.allclose(got[clear, COLUMN["quantile"]], (np.searchsorted(ordered, e[clear]) / len(e)), rtol=1e-6)


def write_config(path: Path, bootstrap: str, topic: str, redis_url: str, prefix: str, app_id: str,
                 **stats: Any) -> Path:
    path.write_text(yaml.safe_dump({"run_dir": str(path.parent / "run"),
                                    "kafka": {"bootstrap_servers": bootstrap, "topic": topic},
                                    "redis": {"url": redis_url, "key_prefix": prefix},
                                    "popularity": PRIORS, "stats": {**STATS, "app_id": app_id, **stats}}))
    return path


def start_worker(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAIN_")}
    return subprocess.Popen([sys.executable, "-m", "streamtrain", "--log-format", "json", "--log-level", "INFO",
                             "stats", "--config", str(config)], stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)


def wait_for(client: redis.Redis, keys: StatsKeys, positions: dict[str, int], proc: subprocess.Popen[bytes],
             log: Path, timeout_s: float = 180.0) -> StatsSnapshot:
    """The first snapshot whose positions reached ``positions`` (every message counted)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        snap = read_snapshot(client, keys)
        if snap is not None and {p: int(o) for p, o in snap.info["positions"].items()} == positions:  # type: ignore[union-attr]
            return snap
        time.sleep(0.5)
    raise AssertionError(f"no snapshot reached {positions} in {timeout_s}s:\n{log.read_text()[-3000:]}")


def ends(messages: list[tuple[int, bytes, bytes]], markers: int = 0) -> dict[str, int]:
    return {str(p): sum(1 for q, *_ in messages if q == p) + markers for p in range(PARTITIONS)}


def listening(pid: int) -> list[str]:
    """Local addresses of the TCP sockets ``pid`` listens on (from /proc)."""
    inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
              if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
    out = []
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                out.append(fields[1])
    return out


_READER = """
import json, sys, faust
bootstrap, topic, group = sys.argv[1], sys.argv[2], sys.argv[3]
last = {int(p): o for p, o in json.loads(sys.argv[4]).items()}  # partition -> offset of its last message
app = faust.App(group, broker="kafka://" + bootstrap, store="memory://", autodiscover=False, web_enabled=False,
                web_bind="127.0.0.1", web_host="127.0.0.1", broker_session_timeout=6.0, broker_commit_interval=0.5,
                consumer_auto_offset_reset="earliest", datadir=sys.argv[5])
reached = set()

@app.agent(app.topic(topic, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw"))
async def read(stream):
    async for event in stream.events():
        if event.message.offset >= last[event.message.partition]:
            reached.add(event.message.partition)
            if reached == set(last):
                print("READ ALL", flush=True)

faust.Worker(app, quiet=True, loglevel="WARNING", redirect_stdouts=False).execute_from_commandline()
"""


def read_as_the_group(bootstrap: str, group: str, topic: str, messages: list[tuple[int, bytes, bytes]],
                      workdir: Path) -> None:
    """A Faust app in the worker's consumer group reads the topic to its end and commits:
    the group's offsets then run ahead of what the worker's changelog holds, which is what
    a recovery cut short by the broker looks like (consumers/stats_app.py). "The end" is the
    offset of each partition's last produced message (explicit partitions, no markers):
    where the group starts reading depends on what the killed worker had committed, so a
    count of messages read would depend on timing."""
    last = {p: sum(1 for q, _, _ in messages if q == p) - 1 for p in range(PARTITIONS)}
    log = workdir / "reader.log"
    proc = subprocess.Popen([sys.executable, "-c", _READER, bootstrap, topic, group, json.dumps(last),
                             str(workdir / "r")], stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "READ ALL" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(2.0)  # a few commit intervals
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_redis_holds_the_counts_and_priors_of_the_produced_events(
        kafka_bootstrap: str, redis_url: str, unique_name: str, tmp_path: Path) -> None:
    topic, prefix = unique_name, f"{unique_name}:"
    create_topics(kafka_bootstrap, [topic], PARTITIONS)
    messages = simulated(exposures=3000, seed=5)
    produce(kafka_bootstrap, topic, messages, end=True)
    config = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, redis_url, prefix, unique_name)
    proc = start_worker(config, tmp_path / "w.log")
    try:
        snap = wait_for(redis.Redis.from_url(redis_url), StatsKeys(prefix), ends(messages, markers=1), proc,
                        tmp_path / "w.log")
        assert_matches(snap, messages)
        addresses = listening(proc.pid)
        assert all(a.startswith("0100007F:") for a in addresses), f"the worker listens beyond loopback: {addresses}"
    finally:
        stop(proc)
    assert proc.returncode == 0, (tmp_path / "w.log").read_text()[-3000:]


def test_sigkilled_worker_restores_its_tables_from_the_changelog_and_redis_is_repopulated(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    topic, prefix, log = unique_name, f"{unique_name}:", tmp_path / "w.log"
    create_topics(kafka_bootstrap, [topic], PARTITIONS)
    messages = simulated(exposures=4000, seed=7)
    messages, tail = messages[:-40], messages[-40:]
    half = len(messages) // 2
    server = EmbeddedRedis(log_dir=tmp_path).start()
    proc = None
    try:
        client, keys = redis.Redis.from_url(server.url), StatsKeys(prefix)
        config = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, server.url, prefix, unique_name)
        produce(kafka_bootstrap, topic, messages[:half])
        proc = start_worker(config, log)
        wait_for(client, keys, ends(messages[:half]), proc, log)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        produce(kafka_bootstrap, topic, messages[half:])  # arrives while the worker is down
        # The group's committed offsets run ahead of what the changelog holds: the worker
        # must go back and re-read, not skip. Its first messages are the few produced last.
        read_as_the_group(kafka_bootstrap, unique_name, topic, messages, tmp_path)
        proc = start_worker(config, log)
        time.sleep(15)  # joined and recovered, waiting at the committed offsets
        produce(kafka_bootstrap, topic, tail)
        messages = messages + tail
        snap = wait_for(client, keys, ends(messages), proc, log)
        assert_matches(snap, messages, one_process=False)  # exact: nothing lost, nothing counted twice
        assert int(snap.info["rewinds"]) >= 1, snap.info
        restored = [line for line in log.read_text().splitlines() if "restored from the changelog" in line]
        assert len(restored) >= 4 and all(" 0 rows" not in line for line in restored[-2:]), restored

        server.stop()  # Redis restarts empty (no persistence): the next snapshot repopulates it
        time.sleep(2)  # snapshots fail meanwhile: counted, retried
        assert proc.poll() is None, log.read_text()[-3000:]
        server = EmbeddedRedis(port=server.port, log_dir=tmp_path).start()
        again = wait_for(client, keys, ends(messages), proc, log, timeout_s=60)
        assert again.same_counts(snap)
    finally:
        if proc is not None:
            stop(proc)
        server.stop()


def committed(bootstrap: str, group: str, topic: str) -> dict[str, int]:
    """The group's committed offsets per partition (a client outside the group asks)."""
    client = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = client.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
        return {str(tp.partition): tp.offset for tp in tps}
    finally:
        client.close()


def test_a_stopped_worker_writes_a_last_snapshot_of_everything_it_counted(
        kafka_bootstrap: str, redis_url: str, unique_name: str, tmp_path: Path) -> None:
    """Timer ticks an hour apart, so the only snapshot is the one a graceful stop writes: it
    holds every event counted. (Before, a stop before the first tick left Redis without one:
    the demo's 30 s ended before the worker's first tick on a loaded machine.)"""
    topic, prefix, log = unique_name, f"{unique_name}:", tmp_path / "w.log"
    create_topics(kafka_bootstrap, [topic], PARTITIONS)
    messages = simulated(exposures=2000, seed=11)
    produce(kafka_bootstrap, topic, messages)
    client, keys = redis.Redis.from_url(redis_url), StatsKeys(prefix)
    proc = start_worker(write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, redis_url, prefix, unique_name,
                                     snapshot_every_s=3600.0), log)
    try:
        deadline = time.monotonic() + 180
        while committed(kafka_bootstrap, unique_name, topic) != ends(messages):  # every message counted
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert read_snapshot(client, keys) is None, "a timer tick wrote a snapshot: this test proves nothing"
    finally:
        stop(proc)
    assert proc.returncode == 0, log.read_text()[-3000:]
    snap = read_snapshot(client, keys)
    assert snap is not None, log.read_text()[-3000:]
    assert {p: int(o) for p, o in snap.info["positions"].items()} == ends(messages)  # type: ignore[union-attr]
    assert_matches(snap, messages)


def test_the_demo_runs_the_stats_worker_and_reports_what_went_to_redis(tmp_path: Path) -> None:
    """The real entry point: embedded broker and Redis, the stats worker beside the daemon,
    popularity from its snapshots, published versions served from Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAIN_")}
    out = subprocess.run([sys.executable, "-m", "streamtrain", "--log-format", "json", "--log-level", "WARNING", "demo",
                          "--duration", "30", "--json", "--set", "publishing.every_samples=5000"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = yaml.safe_load(out.stdout.splitlines()[-1])
    in_redis = summary["redis"]
    assert in_redis["stats_snapshot"]["items"] > 100 and in_redis["stats_snapshot"]["events"] > 1000
    assert in_redis["popularity_source"] == "redis" and in_redis["popularity_fetches"] >= 1
    assert summary["published_versions"] >= 1 and in_redis["serving_current"] == in_redis["serving_versions"][-1]
    assert in_redis["keys"] > 10
    assert "stats: snapshot" in (tmp_path / "runs" / "demo" / "stats.log").read_text()
