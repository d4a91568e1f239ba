"""Helpers to run the real daemon as a subprocess against the session broker."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

import numpy as np

from checkpoints import CheckpointStore
from consumers.schema import hash_id
from streamtrain.simulator import KafkaSink, SimulatorConfig, run_simulation

# Small enough for CI's 2 cores, big enough that a checkpoint write takes a few ms.
SMALL_CONFIG: dict[str, Any] = {
    "kafka": {"partitions": 2},
    "trainer": {"batch_size": 64, "threads": 1, "poll_max_messages": 500},
    "model": {"embedding_dim": 16, "max_history_len": 16, "hstu": {"num_layers": 1, "qk_dim": 8, "v_dim": 8},
              "esmm": {"hidden": [32]}, "retrieval": {"dim": 16}},
    # Windows short enough that clicked and converted samples reach the trainer within the
    # test logs' few minutes of event time (a 1 h convert window would hold every click back).
    "joiner": {"history_len": 16, "click_window_ms": 60_000, "convert_window_ms": 60_000},
    "checkpoints": {"every_samples": 512, "every_seconds": None, "fsync": False, "keep_last": 50},
    "monitors": {name: {"window": 2000} for name in ("label_ratio", "feature_drift", "auc")},
    "publishing": {"every_samples": 2048},
    "metrics": {"port": 0},
    "control": {"port": 0},
    "embeddings": {name: {"initial_rows": 1 << 15, "admission": {"min_count": 1, "sketch_width": 4096}}
                   for name in ("item", "user", "sparse")},
}


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_config(path: Path, bootstrap: str, topic: str, run_dir: Path, **overrides: Any) -> Path:
    doc = deep_merge(SMALL_CONFIG, {"run_dir": str(run_dir),
                                    "kafka": {"bootstrap_servers": bootstrap, "topic": topic, "dlq_topic": f"{topic}.dlq"}})
    path.write_text(yaml.safe_dump(deep_merge(doc, overrides)))
    return path


def produce_log(bootstrap: str, topic: str, mark_end: bool = False, **sim: Any) -> dict[str, Any]:
    """Produce a fixed, seeded event log (conversions within SMALL_CONFIG's windows), with
    ``mark_end`` ended by an end-of-input marker per partition (a daemon then trains every
    sample and exits); returns the simulator's summary."""
    from streamtrain.services.topics import create_topics

    create_topics(bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    sim = {"convert_delay_median_s": 20.0, "max_convert_delay_s": 50.0, **sim}
    clicked: list[int] = []
    stats = run_simulation(SimulatorConfig(**sim), KafkaSink(bootstrap, topic, mark_end=mark_end),
                           truth_sink=lambda t: clicked.append(hash_id(t["event_id"])) if t["click"] else None)
    return {**stats.summary(), "clicked_sample_ids": np.array(clicked, np.int64)}


def daemon_command(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "streamtrain", "--log-format", "json", "--log-level", "WARNING", "run",
            "--config", str(config), *args]


_started: list[subprocess.Popen[bytes]] = []  # every daemon start_daemon started, for kill_leftover_daemons


def start_daemon(config: Path, *args: str, log_path: Path) -> subprocess.Popen[bytes]:
    log = open(log_path, "ab")
    proc = subprocess.Popen(daemon_command(config, *args), stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONHASHSEED": "0"})
    _started.append(proc)
    return proc


def kill_leftover_daemons() -> None:
    """SIGKILL (and reap) every started daemon that still runs.

    A test that fails while its daemon runs (a ``wait`` that timed out, a broker that went
    away) would otherwise leave it retrying forever: it slows every later test and, having
    no parent-death signal, outlives pytest itself."""
    for proc in _started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _started.clear()


atexit.register(kill_leftover_daemons)


@pytest.fixture(autouse=True)
def no_daemon_outlives_its_test() -> Iterator[None]:
    """Autouse in every module that imports it: a failed test leaves no daemon behind."""
    yield
    kill_leftover_daemons()


def metric_value(exposition: bytes, name: bytes) -> float:
    """An unlabelled sample's value in a Prometheus text exposition (NaN if absent, so that
    every comparison with it is false until the daemon exports it)."""
    for line in exposition.splitlines():
        if line.startswith(name + b" "):
            return float(line.split()[1])
    return float("nan")


def scrape_metrics_until(run_dir: Path, done: Callable[[bytes], bool], timeout_s: float) -> bytes:
    """Scrape a running daemon's live metrics endpoint, found as an operator finds it (the
    run directory's ``endpoints.json``), until ``done(exposition)``; returns that exposition."""
    body = b""
    deadline = time.monotonic() + timeout_s
    while not done(body):
        assert time.monotonic() < deadline, body.decode()[-3000:]
        time.sleep(0.2)
        endpoints = run_dir / "endpoints.json"
        if endpoints.exists():
            body = urllib.request.urlopen(orjson.loads(endpoints.read_bytes())["metrics"], timeout=5).read()
    return body


def final_state(run_dir: Path) -> Any:
    with CheckpointStore(run_dir / "checkpoints", readonly=True) as store:
        return store.load()
