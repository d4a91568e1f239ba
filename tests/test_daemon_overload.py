"""Exactly-once recovery (DESIGN §6.1) with overload down-sampling active, on the real
daemon, real broker, real files.

The run is planned in two phases: ``overload.mode=fixed`` at keep-rate 0.5 up to a stop
point, then restarted with keep-rate 0.25. The saved rate holds after the restart until the
next checkpoint, where the new one takes over: a rate change at a checkpoint, mid-stream,
with rows filtered at 0.5 still waiting in the down-sampler. The reference makes that one
planned restart; the disturbed run is also SIGKILLed in both phases (once mid-checkpoint
write) and must end in the reference's state, every value bit for bit, with a ledger chain
holding every trained sample once -- every positive among them, and fewer than all.
"""

from __future__ import annotations

import logging
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from checkpoints import CheckpointStore, ledger_chain, ledger_ids
from daemon_harness import no_daemon_outlives_its_test  # noqa: F401 (autouse: no daemon outlives its test)
from daemon_harness import final_state, metric_value, produce_log, scrape_metrics_until, start_daemon, write_config
from streamtrain.config import load_config
from streamtrain.runtime import Daemon
from streamtrain.runtime.overload import keep_fraction
from streamtrain.services.topics import create_topics
from streamtrain.simulator import KafkaSink, SimulatorConfig, run_simulation
from test_daemon_recovery import _kill_at, assert_same_as_reference

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXPOSURES = 4500
STOP_AT = 1024  # kept samples trained in phase 1 (a multiple of the batch size 64)
PHASES = ({"mode": "fixed", "keep_rate": 0.5}, {"mode": "fixed", "keep_rate": 0.25})


@pytest.fixture(scope="module")
def produced(kafka_bootstrap: str) -> dict:
    topic = f"overload-{time.time_ns()}"
    log = produce_log(kafka_bootstrap, topic, mark_end=True, seed=12, exposures=EXPOSURES, users=300, items=800)
    return {**log, "topic": topic}


def _configs(tmp: Path, bootstrap: str, topic: str, run_dir: Path) -> list[Path]:
    return [write_config(tmp / f"phase{i}.yaml", bootstrap, topic, run_dir, overload=overload)
            for i, overload in enumerate(PHASES)]


def _run_to_exit(config: Path, log: Path, *args: str) -> None:
    proc = start_daemon(config, *args, log_path=log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(kafka_bootstrap: str, produced: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("overload-reference")
    first, second = _configs(tmp, kafka_bootstrap, produced["topic"], tmp / "run")
    _run_to_exit(first, tmp / "log", "--stop-after-samples", str(STOP_AT))
    _run_to_exit(second, tmp / "log")
    return tmp / "run"


def _checkpoints(run_dir: Path) -> list[tuple[str, float, np.ndarray]]:
    """(reason, saved keep-rate, ids trained since the parent) of every checkpoint, in order."""
    with CheckpointStore(run_dir / "checkpoints", readonly=True) as store:
        names = sorted(s.name for s in store.list_checkpoints())
        loaded = [store.load(name) for name in names]
    return [(c.manifest.extra["reason"], float(c.components["overload"]["rate"]), ledger_ids(c.components["ledger"]))
            for c in loaded]


def test_reference_drops_negatives_at_both_rates_and_trains_every_positive(reference: Path, produced: dict) -> None:
    state = final_state(reference).components
    overload = state["overload"]
    assert overload["rate"] == 0.25
    offered, dropped = int(overload["rows_offered"]), int(overload["rows_dropped"])
    trained = ledger_chain(reference / "checkpoints").sample_ids()
    assert state["trainer"]["samples"] == len(trained) == offered - dropped
    assert offered >= EXPOSURES and 0.4 * offered < dropped < 0.8 * offered
    # The simulator's truth counts a few clicks the joiner does not (later than the click
    # window: the sample is a negative) -- those may be dropped, by their id like any
    # negative. Dropping positives would lose 50-75 % of them at keep-rates 0.5 and 0.25.
    truth = produced["clicked_sample_ids"]
    clicked = np.isin(truth, trained)
    assert clicked.sum() > 100 and clicked.mean() > 0.9, f"{(~clicked).sum()} of {len(clicked)} positives not trained"
    assert (keep_fraction(truth[~clicked]) >= 0.25).all(), "an untrained clicked exposure was not droppable by its id"
    checkpoints = _checkpoints(reference)
    rates = [rate for _, rate, _ in checkpoints]
    assert 0.5 in rates and rates[-1] == 0.25 and rates == sorted(rates, reverse=True)
    # After the restart the saved rate (0.5) holds until the next checkpoint: the samples
    # trained up to it include unclicked ones kept at 0.5 that 0.25 would have dropped.
    stop = next(i for i, (reason, _, _) in enumerate(checkpoints) if reason == "shutdown")
    reason, rate, ids = checkpoints[stop + 1]
    assert (reason, rate) == ("cadence", 0.25)
    between = ((keep_fraction(ids) >= 0.25) & (keep_fraction(ids) < 0.5)).sum()
    assert between > 150, f"only {between} of {len(ids)} samples kept at 0.5 after the restart"


def test_sigkilled_daemon_with_down_sampling_matches_the_uninterrupted_run(
    kafka_bootstrap: str, produced: dict, reference: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "crashed"
    first, second = _configs(tmp_path, kafka_bootstrap, produced["topic"], run_dir)
    rng = random.Random(99)
    kills = []
    for config, args, times in ((first, ("--stop-after-samples", str(STOP_AT)), 2), (second, (), 3)):
        for i in range(times):
            proc: subprocess.Popen[bytes] = start_daemon(config, *args, log_path=tmp_path / "log")
            kills.append(_kill_at(proc, run_dir / "checkpoints", rng, during_write=(i == 0)))
            proc.wait(timeout=30)
        _run_to_exit(config, tmp_path / "log", *args)
    assert sum(k != "process ended before the kill" for k in kills) >= 3, kills
    assert_same_as_reference(run_dir, reference, kills)


def test_auto_mode_down_samples_a_growing_backlog_with_alarm_and_metrics(
    kafka_bootstrap: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator's view of a real overload: a producer far faster than the daemon (an
    unpaced simulator on a live topic) makes the backlog long and growing; ``auto`` (with
    thresholds scaled to a test's seconds) cuts an ``overload`` checkpoint that lowers the
    keep-rate, the lag alarm fires through the log alert path, and ``/metrics`` shows both
    (promtool-clean when promtool is installed)."""
    topic = f"overload-live-{time.time_ns()}"
    create_topics(kafka_bootstrap, [topic, f"{topic}.dlq"], partitions=2)
    auto = {"mode": "auto", "backlog_high_s": 0.5, "backlog_low_s": 0.1, "decide_every_s": 0.5, "window_s": 0.5,
            "alarm_backlog_s": 1.0}
    config = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, tmp_path / "run", overload=auto,
                          checkpoints={"every_samples": 100_000})
    daemon = Daemon(load_config(config, environ={}), stop=threading.Event())
    produced = threading.Event()
    sim = SimulatorConfig(seed=13, exposures=40_000, users=300, items=800, convert_delay_median_s=20.0,
                          max_convert_delay_s=50.0)
    producer = threading.Thread(target=run_simulation, args=(sim, KafkaSink(kafka_bootstrap, topic)),
                                kwargs={"stop": produced}, daemon=True)
    runner = threading.Thread(target=daemon.run, name="daemon")
    caplog.set_level(logging.WARNING, logger="streamtrain.daemon")
    producer.start()
    runner.start()
    try:
        body = scrape_metrics_until(tmp_path / "run", lambda body: (
            metric_value(body, b"streamtrain_overload_keep_rate") < 1.0
            and metric_value(body, b"streamtrain_overload_rows_dropped_total") > 0
            and metric_value(body, b"streamtrain_overload_lag_alarm") == 1.0), timeout_s=180)
    finally:
        produced.set()
        producer.join(timeout=60)
        daemon.stop.set()
        runner.join(timeout=120)
    assert metric_value(body, b"streamtrain_overload_backlog_seconds") > 0.5
    alerts = [r for r in caplog.records if getattr(r, "alert", None) == "consumer_lag"]
    assert alerts and alerts[0].levelno == logging.ERROR
    assert any("keep rate of unclicked exposures 1 -> 0.5" in r.getMessage() for r in caplog.records)
    with CheckpointStore(tmp_path / "run" / "checkpoints", readonly=True) as store:
        reasons = {s.manifest.extra["reason"] for s in store.list_checkpoints() if s.manifest is not None}
    assert "overload" in reasons
    if shutil.which("promtool") is not None:
        lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
        assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def test_a_restart_with_another_mode_keeps_the_saved_rate_and_rows(
    kafka_bootstrap: str, produced: dict, tmp_path: Path
) -> None:
    """Switching the mode is a config change like any other: the checkpoint's down-sampler
    (its rate and the rows it holds) is restored even under ``mode: off``, and a checkpoint
    saved without down-sampling is resumed at rate 1 even under ``mode: fixed``."""
    run_dir = tmp_path / "run"
    first, _ = _configs(tmp_path, kafka_bootstrap, produced["topic"], run_dir)
    _run_to_exit(first, tmp_path / "log", "--stop-after-samples", "640")
    saved = final_state(run_dir).components["overload"]
    off = write_config(tmp_path / "off.yaml", kafka_bootstrap, produced["topic"], run_dir, overload={"mode": "off"})
    daemon = Daemon(load_config(off, environ={}), stop=threading.Event())
    try:
        assert daemon.downsampler is not None and daemon.downsampler.rate == 0.5
        assert daemon.downsampler.status()["rows_held"] == len(saved["rates"])
    finally:
        daemon.close()

    fresh = tmp_path / "fresh"
    plain = write_config(tmp_path / "plain.yaml", kafka_bootstrap, produced["topic"], fresh, overload={"mode": "off"})
    _run_to_exit(plain, tmp_path / "log", "--stop-after-samples", "640")
    fixed = write_config(tmp_path / "fixed.yaml", kafka_bootstrap, produced["topic"], fresh,
                         overload={"mode": "fixed", "keep_rate": 0.5})
    daemon = Daemon(load_config(fixed, environ={}), stop=threading.Event())
    try:
        assert daemon.downsampler is not None and daemon.downsampler.rate == 1.0
    finally:
        daemon.close()
