"""`streamtrain report` and the demo's end, from a short real demo run (broker, simulator,
daemon, all through the CLI in a subprocess)."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from rich.console import Console

from streamtrain.report.curves import ORACLE_FILE, read_curves
from streamtrain.report.history import load_history
from streamtrain.report.plots import PLOTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "streamtrain", "--log-format", "json", *args], cwd=REPO,
                          capture_output=True, timeout=timeout, env={**os.environ, "PYTHONHASHSEED": "0"})


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    done = _cli("demo", "--duration", "15", "--no-redis", "--json", "--set", f"run_dir={run_dir}")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return run_dir, orjson.loads(done.stdout.splitlines()[-1])


def _assert_report(page: Path) -> None:
    html = page.read_text()
    for plot in PLOTS:
        png = page.parent / f"{plot.name}.png"
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000, f"{png} is not a drawn PNG"
        assert f'href="{plot.name}.png"' in html, f"{plot.name}.png is not linked"
        assert base64.b64encode(data).decode() in html, f"{plot.name}.png is not embedded: the page must stand alone"
    assert "<img" in html and 'src="http' not in html, "nothing fetched from elsewhere"


def test_the_demo_writes_its_history_the_oracle_and_the_report(demo_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, result = demo_run
    assert result["samples"] > 0
    assert result["report"] == str(run_dir / "report" / "index.html")
    _assert_report(Path(result["report"]))

    history = load_history(run_dir)
    assert history.status[-1]["samples"] == result["samples"], "the last status row is the stopped daemon's"
    assert {"auc", "label_ratio", "feature_drift"} <= set(history.windows)
    auc_rows = [w["rows"] for w in history.windows["auc"]]
    assert auc_rows, "a 15 s demo closes at least one AUC window"
    kinds = {e["kind"] for e in history.events}
    assert {"start", "checkpoint"} <= kinds
    # The oracle is scored on exactly the AUC monitor's windows.
    oracle = read_curves(run_dir)["oracle"]
    assert [p["rows"] for p in oracle] == auc_rows
    assert all(0.5 < p["auc_ctr"] <= 1.0 for p in oracle), oracle
    html = Path(result["report"]).read_text()
    assert "oracle AUC (CTR)" in html and "window AUC (CTR)" in html


def test_report_command_draws_a_run_directory_elsewhere(demo_run: tuple[Path, dict[str, Any]],
                                                       tmp_path: Path) -> None:
    run_dir, _ = demo_run
    (run_dir / ORACLE_FILE).rename(tmp_path / ORACLE_FILE)  # a run without the simulator's truth
    try:
        done = _cli("report", str(run_dir), "--out", str(tmp_path / "out"), "--json")
    finally:
        (tmp_path / ORACLE_FILE).rename(run_dir / ORACLE_FILE)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = orjson.loads(done.stdout.splitlines()[-1])
    assert out["report"] == str(tmp_path / "out" / "index.html")
    assert out["plots"] == [str(tmp_path / "out" / f"{p.name}.png") for p in PLOTS]
    _assert_report(Path(out["report"]))
    assert "oracle AUC" not in Path(out["report"]).read_text()


def test_report_of_a_directory_without_history_is_a_usage_error(tmp_path: Path) -> None:
    done = _cli("report", str(tmp_path), timeout=120)
    assert done.returncode == 2
    assert b"holds no run history" in done.stderr


def test_demo_summary_table_reads_as_a_person_would(demo_run: tuple[Path, dict[str, Any]]) -> None:
    from streamtrain.cli.demo_summary import summary_table

    run_dir, result = demo_run
    console = Console(record=True, width=140, color_system=None)
    console.print(summary_table(result, duration_s=15, checkpoints=str(run_dir / "checkpoints"),
                                published=str(run_dir / "published")))
    text = console.export_text()
    assert f"{result['auc']:.3f} model · {result['oracle_auc']:.3f} oracle" in text
    assert f"{result['samples']:,} in" in text and "samples/s" in text
    assert str(run_dir / "report" / "index.html") in text
    assert str(result["auc"]) not in text, "AUCs are rounded for people; --json keeps the raw value"
