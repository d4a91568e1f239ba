"""The control endpoint and `streamtrain gate` against a real running daemon process.

A status endpoint once passed its tests with a hand-built status and crashed on the first
real one (integer partition keys): these tests talk to `streamtrain run` as an operator
does, through the CLI and raw HTTP, after it has consumed and trained.
"""

from __future__ import annotations

import http.client
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon_harness import produce_log, start_daemon, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def topic(kafka_bootstrap: str) -> str:
    name = f"control-{time.time_ns()}"
    produce_log(kafka_bootstrap, name, seed=7, exposures=3000, users=200, items=500)
    return name


def _cli(*args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "streamtrain", *args], capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def running(kafka_bootstrap: str, topic: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One daemon for the module (a start costs seconds); the tests leave its gate open."""
    tmp_path = tmp_path_factory.mktemp("control")
    config = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, tmp_path / "run")
    proc = start_daemon(config, log_path=tmp_path / "daemon.log")
    try:
        yield {"config": config, "run_dir": tmp_path / "run", "proc": proc}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, (tmp_path / "daemon.log").read_text()[-3000:]


def _status_once_trained(config: Path, deadline_s: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + deadline_s
    last = ""
    while time.monotonic() < deadline:
        code, out = _cli("gate", "status", "--config", str(config))
        last = out
        if code == 0:
            status = orjson.loads(out)
            if status["samples_trained"] > 0 and status["counters"].get("messages", 0) > 0:
                return status
        time.sleep(0.5)
    raise AssertionError(f"the daemon never reported trained samples; last answer:\n{last[-2000:]}")


def test_gate_status_works_once_the_daemon_has_consumed(running: dict[str, Any]) -> None:
    status = _status_once_trained(running["config"])
    assert status["state"] == "running"
    (topic, partitions), = status["offsets"].items()
    assert set(partitions) == {"0", "1"} and all(offset > 0 for offset in partitions.values())
    assert status["gate"]["state"] == "open"
    assert set(status["tables"]) == {"item", "user", "sparse"}


def test_gate_freeze_and_unfreeze_through_the_cli(running: dict[str, Any]) -> None:
    config = str(running["config"])
    _status_once_trained(running["config"])
    code, out = _cli("gate", "freeze", "--config", config, "--reason", "operator test")
    assert code == 0, out
    assert orjson.loads(out) == {"gate": "frozen", "changed": True}
    code, out = _cli("gate", "status", "--config", config)
    assert code == 0 and orjson.loads(out)["gate"]["manual_freeze"] is True
    code, out = _cli("gate", "unfreeze", "--config", config)
    assert code == 0 and orjson.loads(out)["gate"] == "open", out


def test_bad_requests_to_the_real_endpoint_get_answers(running: dict[str, Any]) -> None:
    _status_once_trained(running["config"])
    url = orjson.loads((running["run_dir"] / "endpoints.json").read_bytes())["control"]
    host, port = url.removeprefix("http://").split(":")
    token = (running["run_dir"] / "control.token").read_text().strip()
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/freeze")
    conn.putheader("Authorization", f"Bearer {token}")
    conn.putheader("Content-Length", "twelve")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 400 and b"Content-Length" in response.read()
    conn.close()
    assert running["proc"].poll() is None, "a bad request must not hurt the daemon"
