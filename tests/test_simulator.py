"""Simulator: contract-valid, reproducible, calibrated, and each drift changes what it should."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from streamtrain.simulator import DriftSpec, EventStream, SimulatorConfig
from streamtrain.simulator.stream import SimEvent

REQUIRED = {"event_id": str, "type": str, "ts": int, "user_id": str, "item_id": str, "request_id": str}


def _events(**kw: object) -> list[SimEvent]:
    return list(EventStream(SimulatorConfig(**kw)))


def _exposures(events: list[SimEvent]) -> list[dict]:
    """Exposures in generation order (arrival jitter reorders them slightly on the wire)."""
    docs = [orjson.loads(e.value) for e in events if e.truth is not None]
    return sorted(docs, key=lambda d: int(d["event_id"].rsplit("-x", 1)[1]))


def test_events_follow_the_contract() -> None:
    events = _events(exposures=3000, seed=3)
    ids = set()
    for e in events:
        doc = orjson.loads(e.value)
        for field, typ in REQUIRED.items():
            assert isinstance(doc[field], typ), (field, doc)
        assert doc["type"] in ("exposure", "click", "convert")
        assert 0 < doc["ts"] < 4_102_444_800_000 and len(doc["event_id"]) <= 128
        assert e.key.decode() == doc["user_id"]
        ids.add(doc["event_id"])
        if doc["type"] == "exposure":
            assert isinstance(doc["item_features"]["price"], float)
            assert doc["context"]["device"] in ("ios", "android", "web")
    assert len(ids) == len(events), "event ids must be unique"


def test_clicks_follow_their_exposure_and_converts_follow_clicks() -> None:
    events = [orjson.loads(e.value) for e in _events(exposures=3000, seed=4)]
    by_id = {d["event_id"]: d for d in events}
    for d in events:
        if d["type"] == "click":
            exposure = by_id[d["event_id"][:-2]]
            assert exposure["ts"] < d["ts"] and exposure["request_id"] == d["request_id"]
        if d["type"] == "convert":
            assert by_id[d["event_id"][:-2] + "-c"]["ts"] < d["ts"]


def test_same_seed_same_bytes_other_seed_differs() -> None:
    a = [e.value for e in _events(exposures=500, seed=7, bad_fraction=0.1)]
    b = [e.value for e in _events(exposures=500, seed=7, bad_fraction=0.1)]
    c = [e.value for e in _events(exposures=500, seed=8, bad_fraction=0.1)]
    assert a == b and a != c


def test_bad_fraction_does_not_change_valid_events() -> None:
    clean = [e.value for e in _events(exposures=500, seed=7)]
    mixed = _events(exposures=500, seed=7, bad_fraction=0.3)
    assert [e.value for e in mixed if e.valid] == clean
    bad = [e for e in mixed if not e.valid]
    assert 0.2 < len(bad) / len(clean) < 0.4


@pytest.mark.parametrize("seed", [1, 2])
def test_empirical_rates_match_configured(seed: int) -> None:
    truths = [e.truth for e in _events(exposures=30_000, seed=seed, base_ctr=0.08, base_cvr=0.15) if e.truth]
    clicks = np.array([t["click"] for t in truths])
    converts = np.array([t["convert"] for t in truths])
    assert clicks.mean() == pytest.approx(0.08, rel=0.1)
    assert converts.sum() / clicks.sum() == pytest.approx(0.15, rel=0.15)
    assert set(np.unique(converts[clicks == 0])) <= {0}, "no conversion without a click"


def _ctr(events: list[SimEvent], lo: int, hi: int) -> float:
    truths = [e.truth for e in events if e.truth][lo:hi]
    return float(np.mean([t["click"] for t in truths]))


def test_label_shift_changes_ctr_only_while_active() -> None:
    drift = DriftSpec(kind="label_shift", at_event=10_000, until_event=20_000, magnitude=3.0)
    events = _events(exposures=30_000, seed=5, drifts=[drift])
    before, during, after = _ctr(events, 0, 10_000), _ctr(events, 10_000, 20_000), _ctr(events, 20_000, 30_000)
    assert during > 1.5 * before  # odds x3 on a spread of probabilities: mean CTR ~x1.7
    assert after == pytest.approx(before, rel=0.25)


def test_feature_shift_moves_feature_distribution_not_labels() -> None:
    drift = DriftSpec(kind="feature_shift", at_event=5000, magnitude=3.0)
    events = _events(exposures=10_000, seed=6, drifts=[drift])
    docs = _exposures(events)
    web = lambda ds: np.mean([d["context"]["device"] == "web" for d in ds])  # noqa: E731
    price = lambda ds: np.median([d["item_features"]["price"] for d in ds])  # noqa: E731
    assert web(docs[5000:]) > 0.6 > 0.2 > web(docs[:5000])
    assert price(docs[5000:]) > 2 * price(docs[:5000])
    assert _ctr(events, 5000, 10_000) == pytest.approx(_ctr(events, 0, 5000), rel=0.25)


@pytest.mark.parametrize("mode", ["constant", "garbage"])
def test_broken_feature(mode: str) -> None:
    drift = DriftSpec(kind="broken_feature", at_event=1000, feature="user.segment", broken_mode=mode)
    docs = _exposures(_events(exposures=2000, seed=7, drifts=[drift]))
    before = {d["user_features"]["segment"] for d in docs[:1000]}
    after = [d["user_features"]["segment"] for d in docs[1005:]]  # drifts switch at request boundaries
    assert before <= {"s0", "s1", "s2", "s3"}
    if mode == "constant":
        assert set(after) == {"unknown"}
    else:
        assert len(set(after)) > 900 and not set(after) & before


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    order = np.argsort(scores)
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


def test_concept_shift_breaks_old_knowledge() -> None:
    """After the shift, the pre-shift truth no longer ranks clicks well."""
    cfg = dict(exposures=20_000, seed=8)
    clean = [e.truth for e in _events(**cfg) if e.truth][10_000:]
    shifted = [e.truth for e in _events(**cfg, drifts=[DriftSpec(kind="concept_shift", at_event=10_000)]) if e.truth][10_000:]
    old_scores = np.array([t["p_ctr"] for t in clean])
    labels_shifted = np.array([t["click"] for t in shifted])
    assert _auc(np.array([t["p_ctr"] for t in shifted]), labels_shifted) > 0.7  # oracle still good
    assert _auc(old_scores, labels_shifted) < _auc(old_scores, np.array([t["click"] for t in clean])) - 0.1
