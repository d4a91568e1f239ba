"""bench/quality_offline.py end to end on a tiny demo world: simulator -> real consumer
pipeline -> Trainer.step -> baselines, one JSON line out."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from bench import quality_offline


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The run sets one torch thread (--threads 1); give the others theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_a_short_run_reports_every_scorer_on_the_same_exposure_rows(capsys: pytest.CaptureFixture[str]) -> None:
    assert quality_offline.main(["--exposures", "3000", "--window", "1000", "--mf-lrs", "0.1", "0.5"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = doc["runs"][0]
    assert run["rows"] >= run["exposure_rows"] > 2500  # corrections are extra rows, not exposures
    for task in ("ctr", "ctcvr"):
        last = run[task]["last20"]
        assert set(last) >= {"model", "mf", "mf_lr", "prior", "oracle", "model_calibration"}
        assert last["mf_lr"] in (0.1, 0.5)
        assert all(0.0 <= last[k] <= 1.0 for k in ("model", "mf", "prior", "oracle"))
    # The truth joined by sample id is the simulator's own probability: far above chance.
    assert run["ctr"]["last20"]["oracle"] > 0.85
    assert [w["start"] for w in run["ctr"]["windows"]] == list(range(0, run["exposure_rows"] - 999, 1000))
    assert doc["summary"]["ctr_last20"]["model"] == run["ctr"]["last20"]["model"]
    assert "nce" in run["losses_last20"]
