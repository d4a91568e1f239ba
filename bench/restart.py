"""Restart after SIGKILL: from spawning ``streamtrain run`` again to its first trained batch (part of ``bench.daemon``).

The real CLI (``python -m streamtrain run``, JSON logs at INFO) on a pre-produced log with
a checkpoint after every batch, SIGKILLed as soon as it has committed a few checkpoints,
then started again. restart_s = from spawning the second process to the end of its first
trained batch: the wall time stamped in the manifest of the first checkpoint it writes
(stamped right after that step, before any file is written; if the replay re-commits an
identical step the killed process had already written, the manifest is reused and the
time the new ``LATEST`` was seen is used instead). Split at the ``resumed from`` log line.
Baseline: spawning ``python -c "import <the daemon's module>"`` (interpreter + imports:
the floor of any restart).
"""

from __future__ import annotations

import calendar
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.demo_setup import DemoSetup, produce_log
from streamtrain.runtime import Daemon

# The floor imports the module that defines the daemon, wherever it lives.
DAEMON_MODULE = Daemon.__module__


@dataclass(frozen=True)
class Sizes:
    exposures: int  # in the pre-produced log
    kill_after: int  # checkpoints committed before the SIGKILL
    floor_repeats: int  # spawns of the import floor (best of)


QUICK = Sizes(exposures=6_000, kill_after=2, floor_repeats=1)
FULL = Sizes(exposures=15_000, kill_after=4, floor_repeats=3)


def cli_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "streamtrain", "--log-format", "json", "--log-level", "INFO", "run",
            "--config", str(config)]


def read_latest(root: Path) -> str | None:
    try:
        return (root / "LATEST").read_text().strip() or None
    except FileNotFoundError:
        return None


def log_time(log: Path, prefix: str) -> float | None:
    """Unix time of the first JSON log line whose message starts with ``prefix``."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and str(doc.get("msg", "")).startswith(prefix):
            stamp, _, ms = doc["ts"].rstrip("Z").partition(".")  # UTC, millisecond resolution
            return calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000.0
    return None


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(demo: DemoSetup, tmp: Path, sizes: Sizes) -> dict[str, Any]:
    # A checkpoint after every batch (every_samples 1: whatever the batch size): the first
    # checkpoint after the restart marks the end of the first trained batch.
    cfg = demo.config(tmp / "restart", "bench-restart", checkpoints={"every_samples": 1, "every_seconds": None})
    produce_log(cfg, sizes.exposures)
    config_path = tmp / "restart.yaml"
    config_path.write_text(yaml.safe_dump(cfg.to_dict()))  # the effective config, every key explicit
    root = cfg.checkpoints.root
    env = {**os.environ, "PYTHONHASHSEED": "0"}

    first_log, second_log = tmp / "restart-1.log", tmp / "restart-2.log"
    with open(first_log, "wb") as out:
        proc = subprocess.Popen(cli_command(config_path), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            latest = read_latest(root)
            if latest is not None and int(latest.split("-")[1]) >= sizes.kill_after:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the first daemon did not checkpoint:\n{first_log.read_text()[-2000:]}")
            time.sleep(0.005)
        proc.kill()  # SIGKILL
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_at = read_latest(root)
    assert killed_at is not None

    spawned = time.time()
    with open(second_log, "wb") as out:
        proc = subprocess.Popen(cli_command(config_path), stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 120
        while (latest := read_latest(root)) in (None, killed_at):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the restarted daemon did not train:\n{second_log.read_text()[-2000:]}")
            time.sleep(0.002)
        seen = time.time()
        manifest = json.loads((root / latest / "MANIFEST.json").read_text())
    finally:
        stop_process(proc)
    trained = manifest["wall_time"] if manifest["wall_time"] >= spawned else seen
    resumed = log_time(second_log, "resumed from")

    # Baseline: the interpreter and the daemon's imports, nothing else.
    floors = []
    for _ in range(sizes.floor_repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {DAEMON_MODULE}"], check=True, env=env)
        floors.append(time.perf_counter() - t)
    return {
        "killed_at": killed_at, "resumed_at": latest, "restart_s": trained - spawned,
        "spawn_to_resumed_s": (resumed - spawned) if resumed else None,
        "resumed_to_trained_s": (trained - resumed) if resumed else None,
        "latest_seen_s": seen - spawned, "manifest_reused": manifest["wall_time"] < spawned,
        "baseline_import_s": min(floors), "baseline_import": DAEMON_MODULE,
    }
