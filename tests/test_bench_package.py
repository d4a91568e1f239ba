"""The ``bench`` package imports cleanly, and ``configs/demo.yaml`` is what ``streamtrain demo`` runs.

The benchmarks run as ``python -m bench.<name>`` from the repo root; pytest puts the root on
``sys.path`` too (``pythonpath`` in ``pyproject.toml``), so ``bench`` imports the same way here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import bench
from bench.demo_setup import DEMO_CONFIG_FILE, DemoSetup
from streamtrain.cli import demo_cmd
from streamtrain.config import ConfigError, StreamtrainConfig, build_config, read_yaml

REPO = Path(__file__).resolve().parents[1]
DEMO_YAML = REPO / "configs" / "demo.yaml"
RUNNABLE = {"embeddings", "hstu", "ingest", "monitors", "daemon", "chaos", "trainer", "stats", "scale", "quality", "ablations"}  # the benchmarks docs/benchmarks.md lists


def test_every_bench_module_imports_without_side_effects(capfd: pytest.CaptureFixture[str]) -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__))
    assert RUNNABLE <= set(names), f"a benchmark is missing from bench/: {RUNNABLE - set(names)}"
    for name in names:  # a fresh import of each, so its module body really runs here
        sys.modules.pop(f"bench.{name}", None)
    path_before = list(sys.path)
    modules = {name: importlib.import_module(f"bench.{name}") for name in names}
    assert sys.path == path_before, "importing a benchmark edited sys.path"
    assert capfd.readouterr() == ("", ""), "importing a benchmark printed something"
    for name in RUNNABLE:
        assert callable(getattr(modules[name], "main", None)), f"bench.{name} has no main()"


def _demo_args(config: Path | None = None, overrides: tuple[str, ...] = ()) -> argparse.Namespace:
    return argparse.Namespace(config=config, overrides=list(overrides))


def _clear_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("STREAMTRAIN_")]:
        monkeypatch.delenv(key)


def test_demo_yaml_is_the_config_streamtrain_demo_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_env(monkeypatch)
    # The demo command and the benchmarks find the same file: this checkout's.
    assert demo_cmd.demo_config_file() == DEMO_YAML == DEMO_CONFIG_FILE
    layer = read_yaml(DEMO_YAML)
    demo = demo_cmd._demo_config(_demo_args(), "127.0.0.1:1", None)
    assert demo == build_config(layer, {"kafka": {"bootstrap_servers": "127.0.0.1:1"}})
    # ...and it is the demo's, not the defaults: the values the demo depends on.
    defaults = StreamtrainConfig()
    assert demo.run_dir == Path("runs/demo")
    assert (demo.joiner.policy, defaults.joiner.policy) == ("emit_then_correct", "wait")
    assert (demo.model.embedding_dim, defaults.model.embedding_dim) == (32, 64)
    assert demo.monitors.auc.min_auc == 0.5 and demo.monitors.auc.window == 5000
    assert (demo.metrics.port, demo.control.port) == (0, 0)
    for name in ("item", "user", "sparse"):  # one YAML anchor, three tables
        table = getattr(demo.embeddings, name)
        assert (table.initial_rows, table.admission.sketch_width, table.dim) == (1 << 14, 1 << 16, 32)


def test_the_benchmarks_run_the_demo_config_with_their_own_layers_and_set_last(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _clear_env(monkeypatch)
    broker = argparse.Namespace(bootstrap_servers="127.0.0.1:2")  # DemoSetup reads only its address
    setup = DemoSetup.load(broker, ["trainer.batch_size=128", "checkpoints.every_samples=7"])  # type: ignore[arg-type]
    cfg = setup.config(tmp_path / "run", "bench-x", checkpoints={"every_samples": 1, "every_seconds": None})
    demo = demo_cmd._demo_config(_demo_args(), "127.0.0.1:2", None)
    assert (cfg.run_dir, cfg.kafka.topic, cfg.kafka.dlq_topic) == (tmp_path / "run", "bench-x", "bench-x.dlq")
    assert cfg.checkpoints.every_seconds is None  # the part's layer over the demo's 30 s...
    assert cfg.checkpoints.every_samples == 7  # ...and --set over the part's layer
    assert cfg.trainer.batch_size == 128
    for section in ("kafka", "joiner", "model", "monitors", "publishing", "embeddings", "simulator"):
        ours, theirs = getattr(cfg, section).model_dump(), getattr(demo, section).model_dump()
        if section == "kafka":
            ours |= {"topic": demo.kafka.topic, "dlq_topic": demo.kafka.dlq_topic}
        assert ours == theirs, f"{section} differs from the demo's"


def test_demo_layers_keep_their_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """configs/demo.yaml < --config < STREAMTRAIN_* env < the demo's services < --set."""
    _clear_env(monkeypatch)
    user = tmp_path / "user.yaml"
    user.write_text(yaml.safe_dump({"trainer": {"batch_size": 128}, "simulator": {"users": 50},
                                    "kafka": {"bootstrap_servers": "file:1"}, "redis": {"url": "redis://file"}}))
    monkeypatch.setenv("STREAMTRAIN_TRAINER__BATCH_SIZE", "64")
    monkeypatch.setenv("STREAMTRAIN_KAFKA__BOOTSTRAP_SERVERS", "env:1")
    cfg = demo_cmd._demo_config(_demo_args(user, ("trainer.batch_size=32",)), "services:1", None)
    assert cfg.trainer.batch_size == 32  # --set over env over file over demo (256)
    assert cfg.simulator.users == 50  # file over demo (500)
    assert cfg.kafka.bootstrap_servers == "services:1"  # services over env over file
    assert cfg.redis.url is None  # services over file
    assert cfg.simulator.items == 1000 and cfg.joiner.policy == "emit_then_correct"  # demo, untouched


def test_a_missing_demo_yaml_says_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "configs" / "demo.yaml"
    monkeypatch.setattr(demo_cmd, "demo_config_file", lambda: missing)
    with pytest.raises(ConfigError, match="source checkout") as info:
        demo_cmd._demo_config(_demo_args(), "127.0.0.1:1", None)
    assert str(missing) in str(info.value)


def test_the_demo_command_itself_runs_on_demo_yaml(tmp_path: Path) -> None:
    """The real entry point, from another directory: a --set that only clashes with the demo's
    embedding dim (32, from configs/demo.yaml; the built-in default is 64) stops it with a
    config error before anything starts, on the one table it was set on."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMTRAIN_")}
    out = subprocess.run([sys.executable, "-m", "streamtrain", "demo", "--set", "embeddings.item.dim=64"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "embeddings.item.dim must equal model.embedding_dim (32)" in out.stderr
    assert "embeddings.user.dim" not in out.stderr  # the YAML anchor shares values, not the --set
    assert not (tmp_path / "runs").exists()
