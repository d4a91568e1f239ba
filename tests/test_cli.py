"""The CLI as a user meets it: --help everywhere, --version, exit codes, JSON output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer

from streamtrain.cli import build_parser, main


def _commands(parser=None, prefix=()):  # type: ignore[no-untyped-def]
    parser = parser or build_parser()
    for action in parser._subparsers._group_actions if parser._subparsers else []:  # noqa: SLF001
        for name, sub in action.choices.items():
            yield (*prefix, name)
            yield from _commands(sub, (*prefix, name))


def test_every_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = list(_commands())
    assert ("config", "show") in commands and ("simulate",) in commands
    for cmd in commands:
        with pytest.raises(SystemExit) as info:
            main([*cmd, "--help"])
        assert info.value.code == 0
        assert "usage: streamtrain" in capsys.readouterr().out


def test_version_and_usage_errors() -> None:
    out = subprocess.run([sys.executable, "-m", "streamtrain", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("streamtrain ")
    bad = subprocess.run([sys.executable, "-m", "streamtrain", "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_config_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("trainer:\n  batch_size: 64\n")
    assert main(["config", "validate", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  batch_sise: 64\n")
    assert main(["config", "validate", str(bad)]) == 2
    assert "trainer.batch_sise: unknown key" in capsys.readouterr().err


def test_config_show_json_applies_overrides(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "--json", "--set", "trainer.batch_size=7"]) == 0
    doc = orjson.loads(capsys.readouterr().out.splitlines()[-1])
    assert doc["trainer"]["batch_size"] == 7


@pytest.mark.integration
def test_simulate_to_kafka_with_truth(kafka_bootstrap: str, unique_name: str, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    truth = tmp_path / "truth.jsonl"
    rc = main(["simulate", "--bootstrap-servers", kafka_bootstrap, "--topic", unique_name, "--exposures", "300",
               "--seed", "3", "--truth", str(truth), "--json"])
    assert rc == 0
    summary = orjson.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["exposures"] == 300 and len(truth.read_text().splitlines()) == 300
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": unique_name,
                         "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    consumer.subscribe([unique_name])
    seen = 0
    try:
        for _ in range(60):
            seen += sum(1 for m in consumer.consume(500, timeout=0.5) if m.error() is None)
            if seen >= summary["events"]:
                break
    finally:
        consumer.close()
    assert seen == summary["events"]


def test_checkpoints_commands_list_verify_inspect_rollback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from checkpoints import CheckpointStore

    root = tmp_path / "ckpts"
    with CheckpointStore(root) as store:
        for step in (1, 2):
            store.save(step, {"w": {"format_version": 1, "x": np.full(4, step, np.float32)}},
                       offsets={"events": {0: step * 10}}, watermark=step, config_hash="h")

    def run(*argv: str) -> tuple[int, dict]:
        rc = main(["checkpoints", *argv, "--json"])
        return rc, orjson.loads(capsys.readouterr().out.splitlines()[-1])

    rc, listing = run("list", str(root))
    assert rc == 0 and "ckpt-000000000002" in orjson.dumps(listing).decode()
    rc, verdict = run("verify", str(root))
    assert rc == 0 and verdict["ok"]
    rc, inspected = run("inspect", str(root), "ckpt-000000000001")
    assert rc == 0 and "events" in orjson.dumps(inspected).decode()
    (root / "ckpt-000000000002" / "MANIFEST.json").write_text("{broken")
    rc, verdict = run("verify", str(root), "ckpt-000000000002")
    assert rc == 1 and not verdict["ok"]
    rc, _ = run("rollback", str(root), "ckpt-000000000001")
    assert rc == 0 and (root / "LATEST").read_text().strip() == "ckpt-000000000001"


def test_publish_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamtrain.runtime.publisher import Publisher

    pub = Publisher(tmp_path)
    pub.publish({"w": b"1"}, {"checkpoint": "a"})
    pub.publish({"w": b"2"}, {"checkpoint": "b"})
    assert main(["publish", "list", "--root", str(tmp_path), "--json"]) == 0
    listing = orjson.loads(capsys.readouterr().out.splitlines()[-1])
    assert [(v["version"], v["current"]) for v in listing["versions"]] == [("v000001", False), ("v000002", True)]
    assert main(["publish", "rollback", "v000001", "--root", str(tmp_path)]) == 0
    assert pub.current().name == "v000001"
    assert main(["publish", "rollback", "v000007", "--root", str(tmp_path)]) == 1
    assert "no published version" in capsys.readouterr().err


def test_gate_command_without_a_daemon_says_so(capsys: pytest.CaptureFixture[str], refused_port: int) -> None:
    assert main(["gate", "status", "--url", f"http://127.0.0.1:{refused_port}"]) == 1
    assert "cannot reach the daemon's control endpoint" in capsys.readouterr().err
