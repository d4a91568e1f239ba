"""Daemon operations, in process against the session broker: warm start, a failing
checkpoint disk, the metrics endpoint (promtool) and the control endpoint."""

from __future__ import annotations

import errno
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import torch

from daemon_harness import final_state, metric_value, produce_log, scrape_metrics_until, write_config
from streamtrain.config import load_config
from streamtrain.runtime import Daemon, DaemonHooks

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def topic(kafka_bootstrap: str) -> str:
    name = f"ops-{time.time_ns()}"
    produce_log(kafka_bootstrap, name, seed=5, exposures=4000, users=200, items=500)
    return name


def _daemon(path: Path, **kwargs: Any) -> Daemon:
    return Daemon(load_config(path, environ={}), stop=threading.Event(), **kwargs)


def _after_each_step(action: Callable[[], None]) -> DaemonHooks:
    """Hooks running ``action`` after every training step (on the training thread)."""
    return DaemonHooks(on_trained=lambda batch, result: action())


def test_warm_start_takes_weights_not_offsets(kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    first = _daemon(write_config(tmp_path / "a.yaml", kafka_bootstrap, topic, tmp_path / "a"), stop_after_samples=1024)
    first.run()
    source = final_state(tmp_path / "a")
    assert source.offsets, "the first run consumed something"

    second = _daemon(write_config(tmp_path / "b.yaml", kafka_bootstrap, topic, tmp_path / "b"),
                     warm_start=str(source.path))
    try:
        dense = second.trainer.dense_state()
        assert all(torch.equal(dense[k], source.components["trainer"]["dense"][k]) for k in dense)
        item_rows = source.components["trainer"]["tables"]["item"]["weight"]
        assert torch.equal(second.trainer.tables["item"].table.weight.cpu(), item_rows)
        assert second.trainer.samples == 0, "a warm start is a new run: counters restart"
        assert second.pipeline.positions() != source.offsets, "a warm start must not reuse the old offsets"
    finally:
        second.close()


def test_warm_start_rejects_a_different_model_shape(kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    first = _daemon(write_config(tmp_path / "a.yaml", kafka_bootstrap, topic, tmp_path / "a"), stop_after_samples=256)
    first.run()
    other = write_config(tmp_path / "b.yaml", kafka_bootstrap, topic, tmp_path / "b",
                         model={"esmm": {"hidden": [48]}})
    with pytest.raises(ValueError, match="does not fit this model config"):
        _daemon(other, warm_start=str(final_state(tmp_path / "a").path))


def test_failing_checkpoint_disk_alerts_keeps_training_and_recovers(
    kafka_bootstrap: str, topic: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = {"failing": False, "first_good": None, "samples_while_failing": 0}

    def on_step() -> None:
        d = daemon
        if d.checkpoints_written == 1 and state["first_good"] is None:
            state["first_good"] = d.last_checkpoint
            state["failing"] = True
        if state["failing"]:
            state["samples_while_failing"] = d.trainer.samples
            if d.checkpoint_failures >= 2:
                state["failing"] = False  # the operator freed some space

    daemon = _daemon(write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, tmp_path / "c",
                                  checkpoints={"every_samples": 256, "retry_backoff_seconds": 0.01,
                                               "retry_backoff_max_seconds": 0.01}),
                     stop_after_samples=2048, hooks=_after_each_step(on_step))
    fs = daemon.store._fs  # noqa: SLF001 - the store's one seam for filesystem faults

    def disk_full(op: str, path: Path) -> None:
        if state["failing"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    fs.before = disk_full  # type: ignore[method-assign]
    summary = daemon.run()
    assert summary.samples_trained == 2048
    assert summary.checkpoint_failures >= 2
    assert "checkpoint failed" in caplog.text
    good = final_state(tmp_path / "c")
    assert good.name != state["first_good"], "checkpointing resumed after the disk recovered"
    assert good.components["trainer"]["samples"] == 2048
    assert not list((tmp_path / "c" / "checkpoints").glob(".tmp-*")), "failed writes leave no temp dirs"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package 'prometheus'); "
                                                              "scripts/setup.sh test installs it when run as root")
def test_metrics_endpoint_passes_promtool(kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    daemon = _daemon(write_config(tmp_path / "m.yaml", kafka_bootstrap, topic, tmp_path / "m"))
    runner = threading.Thread(target=daemon.run, name="daemon")
    runner.start()
    try:
        body = scrape_metrics_until(
            tmp_path / "m", lambda body: metric_value(body, b"streamtrain_train_samples_total") > 0, timeout_s=120)
    finally:
        daemon.stop.set()
        runner.join(timeout=120)
    for name in (b"streamtrain_events_consumed_total", b"streamtrain_train_samples_total", b"streamtrain_gate_open",
                 b"streamtrain_embedding_rows", b"streamtrain_freshness_seconds_bucket"):
        assert name in body, name
    lint = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True)
    assert lint.returncode == 0, lint.stdout.decode() + lint.stderr.decode()


def test_control_endpoint_freezes_a_running_daemon(kafka_bootstrap: str, topic: str, tmp_path: Path) -> None:
    seen: dict[str, Any] = {}
    operators: list[threading.Thread] = []

    def control() -> None:
        d = daemon
        if d.trainer.samples == 512:
            assert d.control is not None
            url, token = d.control.url, (tmp_path / "g" / "control.token").read_text().strip()
            # From another thread, as an operator would: the loop applies it at the next step.
            operators.append(threading.Thread(target=lambda: seen.update(_post(url + "/freeze", token)), daemon=True))
            operators[0].start()
            # Hold the loop until the request is queued: a slow HTTP thread on a loaded machine
            # must not lose a race against the remaining 1536 samples.
            deadline = time.monotonic() + 30
            while d._commands.empty():  # noqa: SLF001 - the daemon's command queue
                assert time.monotonic() < deadline, "the freeze request never reached the daemon"
                time.sleep(0.01)
        if d.monitors.gate.state.value == "frozen" and "frozen_at" not in seen:
            seen["frozen_at"] = d.trainer.samples
            seen["versions_at_freeze"] = len(d.publisher.versions())

    daemon = _daemon(write_config(tmp_path / "g.yaml", kafka_bootstrap, topic, tmp_path / "g",
                                  publishing={"every_samples": 256, "shadow_window": 0}),
                     stop_after_samples=2048, hooks=_after_each_step(control))
    daemon.run()
    for operator in operators:  # its answer may still be on the way when the run ends
        operator.join(30)
    assert seen.get("gate") == "frozen", seen
    assert len(daemon.publisher.versions()) == seen["versions_at_freeze"], "nothing is published while FROZEN"
    last = daemon.monitors.gate.last_transition
    assert last is not None and last.manual and last.reason.endswith("test freeze")


def _post(url: str, token: str) -> dict[str, Any]:
    req = urllib.request.Request(url, method="POST", data=b'{"reason": "test freeze"}',
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return orjson.loads(resp.read())
