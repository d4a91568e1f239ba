"""Leave-last-out retrieval metrics: hand-computed values, the held-out selection, and
`streamtrain eval` on a real daemon's checkpoint and published version."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest

from consumers.schema import Action
from streamtrain.retrieval.evaluate import hit_rate_and_ndcg, leave_last_out, ranks_in
from tests.daemon_harness import produce_log, start_daemon, write_config

X, C = int(Action.EXPOSURE), int(Action.CLICK)


def test_hit_rate_and_ndcg_match_hand_computed_values() -> None:
    # Four users; their held-out items were found at ranks 0, 2, 7 and not in the top 10.
    ranks = np.array([0, 2, 7, 10])
    got = hit_rate_and_ndcg(ranks, ks=(1, 3, 10))
    assert got["hr@1"] == 0.25 and got["hr@3"] == 0.5 and got["hr@10"] == 0.75
    assert math.isclose(got["ndcg@1"], 1.0 / 4)
    assert math.isclose(got["ndcg@3"], (1.0 + 1.0 / math.log2(4)) / 4)  # ranks 0 and 2: 1/log2(1+1), 1/log2(2+2)
    assert math.isclose(got["ndcg@10"], (1.0 + 0.5 + 1.0 / math.log2(9)) / 4)
    assert ranks_in(np.array([[5, 6, 7], [1, 2, 3]]), np.array([7, 9])).tolist() == [2, 3]


def test_the_last_click_is_held_out_with_only_what_came_before_its_exposure() -> None:
    # One ring of L=6 (right-aligned): x(10)@1 c(10)@2 x(20)@3 x(30)@4 c(30)@5, and a user with no click.
    items = np.array([[0, 10, 10, 20, 30, 30], [0, 0, 0, 0, 40, 50]])
    actions = np.array([[0, X, C, X, X, C], [0, 0, 0, 0, X, X]])
    ts = np.array([[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]])
    held = leave_last_out(np.array([7, 8]), items, actions, ts)
    assert held.user.tolist() == [7] and held.item.tolist() == [30] and held.ts.tolist() == [4]  # its exposure's time
    assert held.hist_items.tolist() == [[0, 0, 0, 10, 10, 20]]  # neither the exposure of 30 nor the click
    assert held.hist_actions.tolist() == [[0, 0, 0, X, C, X]] and held.hist_ts.tolist() == [[0, 0, 0, 1, 2, 3]]


@pytest.mark.integration
@pytest.mark.slow
def test_streamtrain_eval_reports_the_model_and_popularity(kafka_bootstrap: str, tmp_path: Path) -> None:
    topic = f"eval-{time.time_ns()}"
    produce_log(kafka_bootstrap, topic, mark_end=True, seed=3, exposures=2500, users=100, items=300)
    config = write_config(tmp_path / "c.yaml", kafka_bootstrap, topic, tmp_path / "run", publishing={"every_samples": 1024})
    daemon = start_daemon(config, log_path=tmp_path / "daemon.log")
    assert daemon.wait(timeout=240) == 0, (tmp_path / "daemon.log").read_text()[-2000:]
    latest = (tmp_path / "run" / "checkpoints" / "LATEST").read_text().strip()
    version = sorted(p.name for p in (tmp_path / "run" / "published").glob("v*"))[-1]
    for target in (latest, version):
        done = subprocess.run([sys.executable, "-m", "streamtrain", "eval", "--config", str(config), target, "--json"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        result = orjson.loads(done.stdout.splitlines()[-1])
        assert result["users"] > 20 and result["items"] > 100
        for ranking in ("model", "popularity"):
            values = result[ranking]
            assert set(values) == {f"{m}@{k}" for m in ("hr", "ndcg") for k in (10, 50, 200)}
            assert 0.0 <= values["hr@10"] <= values["hr@50"] <= values["hr@200"] <= 1.0
            assert all(0.0 <= values[f"ndcg@{k}"] <= values[f"hr@{k}"] for k in (10, 50, 200))
