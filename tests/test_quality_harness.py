"""bench.quality's own logic: the evaluated rows and their final labels, AUCs that equal a
brute-force pairwise count (the harness judges the model; it must be right itself), and a
short offline run end to end."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from bench import quality
from bench.quality import Exposures, Rows, Truth, evaluate
from consumers.schema import hash_id
from streamtrain.trainer import Predictions, StepResult


def _step(ids: list[int], click: list[float], convert: list[float], correction: list[bool], p: list[float]) -> tuple:
    n = len(ids)
    batch = {"sample_id": np.array(ids, np.int64), "user": np.arange(n, dtype=np.int64), "item": np.arange(n, dtype=np.int64),
             "click": np.array(click, np.float32), "convert": np.array(convert, np.float32),
             "is_correction": np.array(correction)}
    return batch, StepResult(Predictions(np.array(p, np.float32), np.array(p, np.float32) / 2), {"total": 1.0}, 0.0)


def test_correction_rows_are_not_rows_but_complete_their_exposures_ctcvr_label() -> None:
    rows = Rows()
    rows(*_step([1, 2, 3], [1, 0, 1], [0, 0, 0], [False] * 3, [0.9, 0.1, 0.8]))
    rows(*_step([4, 1], [0, 1], [0, 1], [False, True], [0.2, 0.7]))  # exposure 1 converted late
    exposures = Exposures.of(rows.columns())
    assert exposures.sample_id.tolist() == [1, 2, 3, 4]  # the correction row is not a new row
    assert exposures.ctcvr.tolist() == [1, 0, 0, 0] and np.allclose(exposures.p_ctr, [0.9, 0.1, 0.8, 0.2])


def _pairwise_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_harness_aucs_equal_brute_force_pairwise_counts() -> None:
    rng = np.random.default_rng(0)
    n = 100
    ids = np.arange(1, n + 1, dtype=np.int64)
    truth = Truth()
    for i in ids.tolist():
        truth.add({"event_id": f"x{i}", "p_ctr": float(rng.random()), "p_cvr": float(rng.random())})
    sample_ids = np.array([hash_id(f"x{i}") for i in ids.tolist()], np.int64)
    click = (rng.random(n) < 0.4).astype(np.float32)
    ctcvr = click * (rng.random(n) < 0.7)
    model = np.round(rng.random(n), 1)  # rounded: ties must count half
    rows = Exposures(sample_ids, rng.integers(0, 5, n), rng.integers(0, 7, n), click, ctcvr, model, model * 0.5)
    got = evaluate(rows, truth, (0.1, 0.5), window=20)
    last, half = slice(n - n // 5, n), slice(n // 2, n)
    assert abs(got["ctr"]["last_20pct"]["model"] - _pairwise_auc(model[last], click[last])) < 1e-4
    true_ctr, _ = truth.at(sample_ids)
    assert abs(got["ctr"]["second_half"]["oracle"] - _pairwise_auc(true_ctr[half], click[half])) < 1e-4
    assert abs(got["ctcvr"]["second_half"]["model"] - _pairwise_auc(model[half] * 0.5, ctcvr[half])) < 1e-4
    assert [w["rows"] for w in got["ctr"]["windows"]] == [20, 40, 60, 80, 100]
    assert abs(got["ctr"]["windows"][1]["model"] - _pairwise_auc(model[20:40], click[20:40])) < 1e-4


@pytest.fixture
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_short_offline_run_reports_every_scorer_on_the_same_rows(capsys: pytest.CaptureFixture[str]) -> None:
    quality.main(["--offline", "--seeds", "0", "--exposures", "3000", "--window", "1000", "--mf-lrs", "0.1", "0.5"])
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = doc["seeds"]["0"]
    assert run["trained_rows"] >= run["rows"] > 2500  # corrections are extra rows, not exposures
    for task in ("ctr", "ctcvr"):
        last = run[task]["last_20pct"]
        assert set(last) >= {"model", "mf", "mf_lr", "prior", "oracle", "meanpool", "model_calibration"}
        assert last["mf_lr"] in (0.1, 0.5) and all(0.0 <= last[k] <= 1.0 for k in ("model", "mf", "prior", "oracle"))
    assert run["ctr"]["last_20pct"]["oracle"] > 0.85  # the truth joined by sample id is the simulator's own
    assert doc["ctr_auc"] == run["ctr"]["last_20pct"]["model"] and doc["meanpool_auc"] is not None
    assert set(run["retrieval"]) >= {"users", "items", "model", "popularity"}
