"""compose/: the deployment parses, its parts agree with each other, the alert rules pass
promtool (checks and unit tests), and every metric the dashboard and the rules use is on a
live daemon's /metrics (no docker engine needed: the file checks are static)."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from daemon_harness import produce_log, write_config
from streamtrain.config import load_config
from streamtrain.runtime import Daemon
from streamtrain.runtime.live import status_panel

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "compose"
DASHBOARD = COMPOSE / "grafana" / "dashboards" / "streamtrain.json"
METRIC = re.compile(r"\bstreamtrain_[a-z0-9_]+")

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not installed (Debian package 'prometheus'); "
                                           "scripts/setup.sh test installs it when run as root")


def _compose_doc() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="docker-compose not installed (Debian package 'docker-compose'); "
                           "scripts/setup.sh test installs it when run as root")
def test_compose_file_parses_with_every_port_on_loopback() -> None:
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE / "docker-compose.yml"), "--profile", "demo", "config"],
                          capture_output=True, cwd=COMPOSE)
    assert done.returncode == 0, done.stderr.decode()
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {"kafka", "topics", "redis", "streamtrain", "simulator", "prometheus", "grafana"}
    assert {name: s["profiles"] for name, s in services.items() if "profiles" in s} == {"simulator": ["demo"]}
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_parts_agree_with_each_other() -> None:
    """Static checks a compose parse cannot make: the daemon's config, the scrape target,
    the rule file, Grafana's datasource and dashboard paths all point at each other."""
    services = _compose_doc()["services"]
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:") and "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]
    assert not any("zookeeper" in s.get("image", "") for s in services.values()), "KRaft: no ZooKeeper"
    for name, service in services.items():  # every bind-mounted file or folder exists
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name} mounts missing {source}"

    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["streamtrain"]["volumes"]}
    daemon_argv = services["streamtrain"]["command"]
    config_path = daemon_argv[daemon_argv.index("--config") + 1]
    config = load_config(COMPOSE / mounts[config_path], environ={})
    assert config.kafka.bootstrap_servers == "kafka:19092"
    assert "INTERNAL://kafka:19092" in kafka["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert config.redis.url == "redis://redis:6379/0"
    assert config.metrics.host == "0.0.0.0", "Prometheus scrapes the daemon from its own container"
    assert config.control.host == "127.0.0.1", "the control endpoint stays on the container's loopback"
    assert str(config.run_dir).startswith("/var/lib/streamtrain"), "run_dir lives on the `runs` volume"

    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    targets = [t for job in prometheus["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"streamtrain:{config.metrics.port}"]
    rule_mount = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"] if v.startswith(".")}
    assert all(rule_mount.get(f) == "./alerts.yml" for f in prometheus["rule_files"])

    grafana_mounts = {v.split(":")[0]: v.split(":")[1] for v in services["grafana"]["volumes"]}
    datasources = yaml.safe_load((COMPOSE / "grafana/provisioning/datasources/prometheus.yml").read_text())
    providers = yaml.safe_load((COMPOSE / "grafana/provisioning/dashboards/streamtrain.yml").read_text())
    assert [p["options"]["path"] for p in providers["providers"]] == [grafana_mounts["./grafana/dashboards"]]
    uids = {d["uid"] for d in datasources["datasources"]}
    assert {ds["uid"] for ds in _dashboard_datasources(orjson.loads(DASHBOARD.read_bytes()))} <= uids


def _dashboard_datasources(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        ds = node.get("datasource")
        if isinstance(ds, dict) and ds.get("type") == "prometheus":
            yield ds
        for value in node.values():
            yield from _dashboard_datasources(value)
    elif isinstance(node, list):
        for value in node:
            yield from _dashboard_datasources(value)


@needs_promtool
def test_alert_rules_pass_promtool_checks_and_unit_tests() -> None:
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run(["promtool", *args], capture_output=True, cwd=COMPOSE)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    tested = set(re.findall(r"alertname: (\w+)", (COMPOSE / "alerts_test.yml").read_text()))
    assert {"StreamtrainGateFrozen", "StreamtrainConsumerLagGrowing"} <= tested


def _expressions(node: Any) -> Iterator[str]:
    """Every PromQL expression of a dashboard (targets, annotations, variables) or rule file."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query", "definition") and isinstance(value, str):
                yield value
            else:
                yield from _expressions(value)
    elif isinstance(node, list):
        for value in node:
            yield from _expressions(value)


def _used_metrics() -> dict[str, set[str]]:
    dashboard = set().union(*(METRIC.findall(e) for e in _expressions(orjson.loads(DASHBOARD.read_bytes()))))
    rules = set().union(*(METRIC.findall(e) for e in _expressions(yaml.safe_load((COMPOSE / "alerts.yml").read_text()))))
    return {"dashboard": dashboard, "alerts.yml": rules}


def test_the_dashboard_and_the_rules_cover_what_the_issue_asks() -> None:
    used = _used_metrics()
    for name in ("streamtrain_train_samples_total", "streamtrain_consumer_lag_messages", "streamtrain_freshness_seconds_bucket",
                 "streamtrain_loss", "streamtrain_monitor_auc", "streamtrain_monitor_rate", "streamtrain_monitor_psi",
                 "streamtrain_gate_open", "streamtrain_gate_frozen_by", "streamtrain_checkpoints_written_total",
                 "streamtrain_releases_released_total"):
        assert name in used["dashboard"], name
    alerts = {r["alert"] for g in yaml.safe_load((COMPOSE / "alerts.yml").read_text())["groups"] for r in g["rules"]}
    assert {"StreamtrainGateFrozen", "StreamtrainConsumerLagGrowing", "StreamtrainFreshnessHigh",
            "StreamtrainCheckpointStale", "StreamtrainCheckpointFailing", "StreamtrainDlqRateHigh",
            "StreamtrainNotTraining"} <= alerts
    runbook = (REPO / "docs" / "operations.md").read_text()
    for alert in alerts:
        assert f"### {alert}" in runbook, f"docs/operations.md has no section for {alert}"


@pytest.mark.integration
def test_every_metric_of_the_dashboard_and_the_rules_is_on_a_live_daemon(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = f"compose-{time.time_ns()}"
    produce_log(kafka_bootstrap, topic, seed=11, exposures=3000, users=200, items=500)
    # Small windows so every monitor series appears within the log; no freeze, so a version is published.
    small: dict[str, Any] = {name: {"window": 200, "warmup_windows": 1} for name in ("label_ratio", "feature_drift", "auc")}
    small["gate"] = {"freeze_on": []}
    config = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, tmp_path / "run", monitors=small,
                          checkpoints={"every_samples": 256}, publishing={"every_samples": 512, "shadow_window": 0})
    daemon = Daemon(load_config(config, environ={}), stop=threading.Event())
    runner = threading.Thread(target=daemon.run, name="daemon")
    runner.start()
    wanted = set().union(*_used_metrics().values())
    exported: set[str] = set()
    try:
        deadline = time.monotonic() + 180
        while not wanted <= exported:  # scraped as Prometheus would, until every series has appeared
            assert time.monotonic() < deadline, f"never exported: {sorted(wanted - exported)}"
            time.sleep(0.5)
            endpoints = tmp_path / "run" / "endpoints.json"
            if endpoints.exists():
                body = urllib.request.urlopen(orjson.loads(endpoints.read_bytes())["metrics"], timeout=5).read()
                exported = {s.name for f in text_string_to_metric_families(body.decode()) for s in f.samples}
        # The live panel renders the same real snapshot (a status view once crashed on its first real one).
        console = Console(record=True, width=160, color_system=None)
        console.print(status_panel(daemon.status()))
        panel = console.export_text()
        assert "samples" in panel and "window AUC CTR 0." in panel, panel
    finally:
        daemon.stop.set()
        runner.join(timeout=120)
