"""Exactly-once recovery (DESIGN §6.1) on the real daemon, real broker, real files.

A fixed, seeded event log is trained once uninterrupted (the reference). Every other run
here is disturbed — SIGKILLed at several moments (one of them mid-checkpoint-write),
stopped by SIGTERM and resumed, starved by a SIGSTOPped broker, restarted on a corrupted
latest checkpoint — and must end in the state of the reference, every value of every
component bit for bit (but what ``streamtrain.runtime.exactness.NOT_REPLAYED`` names, each with
its reason), and a ledger chain holding every trained sample id exactly once.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from checkpoints import ledger_chain, state_differences
from daemon_harness import no_daemon_outlives_its_test  # noqa: F401 (autouse: no daemon outlives its test)
from daemon_harness import final_state, produce_log, start_daemon, write_config
from streamtrain.runtime.exactness import NOT_REPLAYED

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPOSURES = 4500  # asked of the simulator (it finishes the last request); every one becomes a sample
KILLS = 5


@pytest.fixture(scope="module")
def produced(kafka_bootstrap: str) -> dict:
    topic = f"recovery-{time.time_ns()}"
    log = produce_log(kafka_bootstrap, topic, mark_end=True, seed=11, exposures=EXPOSURES, users=300, items=800)
    return {**log, "topic": topic}


@pytest.fixture(scope="module")
def event_log(produced: dict) -> str:
    return produced["topic"]


@pytest.fixture(scope="module")
def reference(kafka_bootstrap: str, event_log: str, produced: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Run dir of one uninterrupted run to the end of the log: every exposure trained."""
    tmp = tmp_path_factory.mktemp("reference")
    config = write_config(tmp / "reference.yaml", kafka_bootstrap, event_log, tmp / "run")
    _run_to_end(config, tmp / "reference.log")
    assert final_state(tmp / "run").components["trainer"]["samples"] == produced["exposures"]
    return tmp / "run"


def _run_to_end(config: Path, log: Path, *args: str) -> None:
    """Run the daemon until it exits by itself: at the end of the log (or ``args``' stop point).
    Ending where the log ends makes the final state — what was consumed, joined, buffered —
    the same however the run was interrupted, so the whole of it can be compared."""
    proc = start_daemon(config, *args, log_path=log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def assert_same_as_reference(run_dir: Path, reference_dir: Path, what: object) -> None:
    reference, got = final_state(reference_dir), final_state(run_dir)
    samples = reference.components["trainer"]["samples"]
    assert got.components["trainer"]["samples"] == samples
    differences = state_differences(reference.components, got.components, NOT_REPLAYED)
    assert not differences, f"state differs from the uninterrupted run after {what}:\n" + "\n".join(differences[:40])
    assert got.offsets == reference.offsets and got.watermark == reference.watermark
    ref_ids = ledger_chain(reference_dir / "checkpoints").sample_ids()
    got_ids = ledger_chain(run_dir / "checkpoints").sample_ids()
    assert len(got_ids) == samples and len(np.unique(got_ids)) == samples, "a sample trained twice or lost"
    assert np.array_equal(np.sort(got_ids), np.sort(ref_ids))


def _wait_for_first_checkpoint(root: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not list(root.glob("ckpt-*")) and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill_at(proc: subprocess.Popen[bytes], ckpt_root: Path, rng: random.Random, during_write: bool) -> str:
    """SIGKILL once training has made progress: either the moment a checkpoint's temp dir
    exists (mid-write) or at a random delay after this process's first new checkpoint
    (at its second one if that comes first: on a fast machine the delay can cover the rest
    of the run, and a process that reaches its stop point was never killed).

    Only what this process writes counts: a temp dir left by the previous kill stays until
    the new process has started up and cleaned it."""
    known = set(ckpt_root.glob("ckpt-*")) | set(ckpt_root.glob(".tmp-ckpt-*")) if ckpt_root.exists() else set()
    deadline = time.monotonic() + 120
    delay_after_first = rng.uniform(0.0, 0.4)
    first_seen: float | None = None
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt_root.exists():
            if during_write and set(ckpt_root.glob(".tmp-ckpt-*")) - known:
                proc.send_signal(signal.SIGKILL)
                return "during checkpoint write"
            if not during_write:
                new = set(ckpt_root.glob("ckpt-*")) - known
                if first_seen is None and new:
                    first_seen = time.monotonic()
                if first_seen is not None and (time.monotonic() - first_seen >= delay_after_first or len(new) > 1):
                    proc.send_signal(signal.SIGKILL)
                    return f"{delay_after_first:.2f}s after a checkpoint" if len(new) == 1 else "at the next checkpoint"
        time.sleep(0.001)
    return "process ended before the kill"


def test_sigkilled_daemon_trains_every_sample_exactly_once_and_matches_uninterrupted(
    kafka_bootstrap: str, event_log: str, produced: dict, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "crashed"
    config = write_config(tmp_path / "crashed.yaml", kafka_bootstrap, event_log, run_dir)
    rng = random.Random(1234)
    kills = []
    for i in range(KILLS):
        proc = start_daemon(config, log_path=tmp_path / "crashed.log")
        kills.append(_kill_at(proc, run_dir / "checkpoints", rng, during_write=(i % 2 == 0)))
        proc.wait(timeout=30)
    assert sum(k == "during checkpoint write" for k in kills) >= 1, kills
    assert sum(k != "process ended before the kill" for k in kills) >= KILLS - 1, kills
    _run_to_end(config, tmp_path / "crashed.log")
    assert_same_as_reference(run_dir, reference, kills)
    trained = ledger_chain(run_dir / "checkpoints").sample_ids()
    clicked = np.isin(trained, produced["clicked_sample_ids"]).sum()
    assert clicked > 100, f"only {clicked} clicked samples trained: the proof must cover positives too"


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(
    kafka_bootstrap: str, event_log: str, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", kafka_bootstrap, event_log, run_dir)
    proc = start_daemon(config, log_path=tmp_path / "log")
    _wait_for_first_checkpoint(run_dir / "checkpoints")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, (tmp_path / "log").read_text()[-3000:]
    stopped = final_state(run_dir)
    assert stopped.manifest.extra["reason"] == "shutdown"
    assert 0 < stopped.components["trainer"]["samples"] < EXPOSURES
    _run_to_end(config, tmp_path / "log")
    assert_same_as_reference(run_dir, reference, "SIGTERM + resume")


def test_broker_stall_loses_and_duplicates_nothing(
    broker: object, kafka_bootstrap: str, event_log: str, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", kafka_bootstrap, event_log, run_dir)
    proc = start_daemon(config, log_path=tmp_path / "log")
    _wait_for_first_checkpoint(run_dir / "checkpoints")
    broker.pause()  # type: ignore[attr-defined]
    try:
        time.sleep(20)
        assert proc.poll() is None, "the daemon must wait out a stalled broker, not exit"
    finally:
        broker.resume()  # type: ignore[attr-defined]
    assert proc.wait(timeout=180) == 0, (tmp_path / "log").read_text()[-3000:]
    assert_same_as_reference(run_dir, reference, "a 20 s broker SIGSTOP")


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(
    kafka_bootstrap: str, event_log: str, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    config = write_config(tmp_path / "c.yaml", kafka_bootstrap, event_log, run_dir)
    _run_to_end(config, tmp_path / "log", "--stop-after-samples", str(EXPOSURES // 2 // 64 * 64))
    root = run_dir / "checkpoints"
    latest = root / (root / "LATEST").read_text().strip()
    weights = next(latest.glob("trainer*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    _run_to_end(config, tmp_path / "log")
    assert "skipped damaged checkpoint" in (tmp_path / "log").read_text()
    assert_same_as_reference(run_dir, reference, "a corrupted latest checkpoint")
