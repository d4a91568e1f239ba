"""The wired suite on synthetic streams: no false freezes, every drift kind caught and
cleared, replays and restores reproduce the same verdicts."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest

from monitors import (
    AucMonitorConfig,
    FeatureDriftMonitorConfig,
    GateConfig,
    GateState,
    LabelRatioMonitorConfig,
    MonitorsConfig,
    MonitorSuite,
    Transition,
    Verdict,
)
from monitors.testing import Drift, SyntheticStream

W = 5_000  # small windows: many judged windows per test, same thresholds as production
BATCH = 1_000


def config(window: int = W, **gate: Any) -> MonitorsConfig:
    return MonitorsConfig(
        label_ratio=LabelRatioMonitorConfig(window=window),
        feature_drift=FeatureDriftMonitorConfig(window=window),
        auc=AucMonitorConfig(window=window),
        gate=GateConfig(**gate),
    )


class ListSink:
    def __init__(self) -> None:
        self.verdicts: list[Verdict] = []
        self.transitions: list[Transition] = []

    def on_verdict(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)

    def on_transition(self, transition: Transition) -> None:
        self.transitions.append(transition)

    def close(self, timeout: float) -> bool:
        return True


def make_suite(cfg: MonitorsConfig, stream: SyntheticStream) -> tuple[MonitorSuite, ListSink]:
    sink = ListSink()
    suite = MonitorSuite(cfg, stream.sparse_features, stream.dense_features, sinks=[sink], clock=lambda: 1.7e9)
    return suite, sink


def feed(suite: MonitorSuite, stream: SyntheticStream, samples: int, drift: Drift = Drift()) -> list[Verdict]:
    return [v for _ in range(samples // BATCH) for v in suite.update(**stream.batch(BATCH, drift))]


@pytest.mark.parametrize("window", [W, 20_000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_stream_never_freezes(seed: int, window: int) -> None:
    stream = SyntheticStream(seed)
    suite, sink = make_suite(config(window), stream)
    verdicts = feed(suite, stream, 200_000)
    assert len(verdicts) == 3 * 200_000 // window
    assert sink.transitions == []
    assert not any(v.alarm for v in verdicts)
    psi = [x for v in verdicts for k, x in v.metrics.items() if k.startswith("psi/")]
    assert psi and max(psi) < 0.02  # identical distributions: PSI at noise level


ONSET, DRIFT_LEN, AFTER = 32_000, 40_000, 40_000  # onset falls mid-window on purpose
DRIFTS = {
    "ctr_x2": (Drift(ctr_scale=2.0), "label_ratio"),
    "ctr_x0.5": (Drift(ctr_scale=0.5), "label_ratio"),
    "scores_become_noise": (Drift(noise_scores=True), "auc"),
    "sparse_popularity_reversed": (Drift(sparse_reversed=frozenset({0})), "feature_drift"),
    "dense_shift": (Drift(dense_shift={1: 1.0}), "feature_drift"),
    "sparse_constant_high_cardinality": (Drift(sparse_constant={2: 12345}), "feature_drift"),
    "sparse_all_missing": (Drift(sparse_constant={1: 0}), "feature_drift"),
    "dense_constant": (Drift(dense_constant={1: 0.5}), "feature_drift"),
    "dense_all_missing": (Drift(dense_constant={0: math.nan}), "feature_drift"),
}


@pytest.mark.parametrize("kind", sorted(DRIFTS))
def test_drift_freezes_the_gate_within_bound_and_auto_reopens_after_it_ends(kind: str) -> None:
    drift, monitor = DRIFTS[kind]
    cfg = config()
    stream = SyntheticStream(3)
    suite, sink = make_suite(cfg, stream)
    feed(suite, stream, ONSET)
    assert sink.transitions == []
    verdicts = feed(suite, stream, DRIFT_LEN, drift)
    # a window that straddles the onset may pass; the next alarm_after windows are all bad
    bound = ONSET + (cfg.label_ratio.alarm_after + 1) * W
    first_alarm = next(v for v in verdicts if v.monitor == monitor and v.alarm)
    assert first_alarm.sample_count <= bound
    freeze = sink.transitions[0]
    assert freeze.to_state is GateState.FROZEN and monitor in freeze.monitors
    assert freeze.sample_count <= bound
    assert not suite.gate.publish_allowed()

    feed(suite, stream, AFTER)
    reopen = sink.transitions[-1]
    assert reopen.to_state is GateState.OPEN and not reopen.manual
    assert reopen.sample_count <= ONSET + DRIFT_LEN + (cfg.label_ratio.clear_after + 1) * W
    assert suite.gate.publish_allowed()
    assert len(sink.transitions) == 2


def test_manual_policy_stays_frozen_after_the_drift_until_an_operator_unfreezes() -> None:
    stream = SyntheticStream(4)
    suite, sink = make_suite(config(unfreeze="manual"), stream)
    feed(suite, stream, ONSET)
    feed(suite, stream, DRIFT_LEN, Drift(ctr_scale=2.0))
    feed(suite, stream, AFTER)
    assert not suite.monitors["label_ratio"].alarm  # the alarm cleared ...
    assert suite.gate.state is GateState.FROZEN  # ... but the gate waits for a human
    opened = suite.gate.unfreeze("checked the dashboards")
    assert opened is not None and opened.manual and opened.monitors == ()
    assert suite.gate.publish_allowed()
    assert [t.to_state for t in sink.transitions] == [GateState.FROZEN, GateState.OPEN]


def test_rebaseline_accepts_a_permanent_shift() -> None:
    stream = SyntheticStream(5)
    suite, sink = make_suite(config(), stream)
    feed(suite, stream, 30_000)
    feed(suite, stream, 30_000, Drift(dense_shift={1: 1.0}))
    assert suite.gate.state is GateState.FROZEN
    suite.rebaseline(["feature_drift"])
    verdicts = feed(suite, stream, 60_000, Drift(dense_shift={1: 1.0}))  # the shift is the new normal
    assert suite.gate.state is GateState.OPEN
    assert not any(v.alarm for v in verdicts)
    with pytest.raises(ValueError, match="no such monitor"):
        suite.rebaseline(["psi"])


def concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def drifting_stream(seed: int) -> dict[str, np.ndarray]:
    stream = SyntheticStream(seed)
    plan = [Drift()] * 25 + [Drift(ctr_scale=2.0, noise_scores=True, dense_shift={0: 5.0})] * 20 + [Drift()] * 20
    return concat([stream.batch(BATCH, d) for d in plan])


def run_sliced(suite: MonitorSuite, data: dict[str, np.ndarray], cuts: list[int]) -> list[dict[str, Any]]:
    bounds = [0, *cuts, len(data["click"])]
    return [
        v.to_dict()
        for start, stop in zip(bounds, bounds[1:])
        for v in suite.update(**{k: a[start:stop] for k, a in data.items()})
    ]


def test_verdicts_do_not_depend_on_batch_boundaries() -> None:
    data = drifting_stream(6)
    n = len(data["click"])
    stream = SyntheticStream(6)
    runs = []
    for step in (1_000, 337, 7_919):
        suite, _ = make_suite(config(), stream)
        runs.append(run_sliced(suite, data, list(range(step, n, step))))
    assert runs[0] == runs[1] == runs[2]
    assert any(v["alarm"] for v in runs[0])  # the comparison covered alarms, not only quiet windows


@pytest.mark.parametrize("cut", [7_500, 23_200, 33_000, 41_700, 52_100])  # mid warm-up ... mid-alarm ... clearing
def test_state_round_trip_mid_stream_gives_identical_verdicts(cut: int) -> None:
    data = drifting_stream(7)
    stream = SyntheticStream(7)
    original, original_sink = make_suite(config(), stream)
    head = run_sliced(original, {k: a[:cut] for k, a in data.items()}, [])
    state = original.state_dict()
    tail = {k: a[cut:] for k, a in data.items()}
    cuts = list(range(BATCH, len(tail["click"]), BATCH))
    expected = run_sliced(original, tail, cuts)  # keeps running after the snapshot: state must be a copy

    restored, restored_sink = make_suite(config(), stream)
    restored.load_state_dict(state)
    assert restored.gate.state == GateState(state["gate"]["state"])
    assert run_sliced(restored, tail, cuts) == expected
    after_snapshot = original_sink.transitions[len(original_sink.transitions) - len(restored_sink.transitions) :]
    assert [t.to_dict() for t in restored_sink.transitions] == [t.to_dict() for t in after_snapshot]
    assert head and expected


def plain_types_only(value: Any) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and plain_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(plain_types_only(v) for v in value)
    return value is None or isinstance(value, (np.ndarray, bool, int, float, str))


def test_state_holds_only_arrays_and_primitives() -> None:
    stream = SyntheticStream(8)
    suite, _ = make_suite(config(), stream)
    feed(suite, stream, 7_000)  # mid warm-up: raw reference buffers
    assert plain_types_only(suite.state_dict())
    feed(suite, stream, 20_000)
    state = suite.state_dict()
    assert plain_types_only(state) and state["format_version"] == 1


def test_incompatible_monitor_state_restarts_that_monitor(caplog: pytest.LogCaptureFixture) -> None:
    stream = SyntheticStream(9)
    suite, _ = make_suite(config(), stream)
    feed(suite, stream, 12_000)
    state = suite.state_dict()
    bigger = MonitorsConfig(auc=AucMonitorConfig(window=2 * W), label_ratio=LabelRatioMonitorConfig(window=W),
                            feature_drift=FeatureDriftMonitorConfig(window=W))
    other, _ = make_suite(bigger, stream)
    other.load_state_dict(state)
    assert other.monitors["label_ratio"].samples == 12_000
    assert other.monitors["auc"].samples == 0 and other.monitors["auc"].warming_up
    assert "auc" in caplog.text


def test_status_is_json_serialisable() -> None:
    stream = SyntheticStream(10)
    suite, _ = make_suite(config(), stream)
    assert json.loads(json.dumps(suite.status(), allow_nan=False))["gate"]["state"] == "open"
    feed(suite, stream, 3 * W)
    status = json.loads(json.dumps(suite.status(), allow_nan=False))
    assert status["samples"] == 3 * W
    assert status["monitors"]["auc"]["last_verdict"]["metrics"]["auc/ctr"] > 0.6
    assert set(status["monitors"]) == {"label_ratio", "feature_drift", "auc"}


def test_update_rejects_batches_that_do_not_match_the_declared_features() -> None:
    stream = SyntheticStream(11)
    suite, _ = make_suite(config(), stream)
    batch = stream.batch(10)
    with pytest.raises(ValueError, match="sparse"):
        suite.update(**{**batch, "sparse": batch["sparse"][:, :2]})
    with pytest.raises(ValueError, match="click"):
        suite.update(**{**batch, "click": batch["click"][:5]})


def test_disabled_monitors_and_features_are_left_out() -> None:
    cfg = MonitorsConfig(auc=AucMonitorConfig(enabled=False), feature_drift=FeatureDriftMonitorConfig(exclude=("a",)))
    suite = MonitorSuite(cfg, ["a"], [])
    assert set(suite.monitors) == {"label_ratio"}
    with pytest.raises(ValueError, match="undeclared"):
        MonitorSuite(MonitorsConfig(feature_drift=FeatureDriftMonitorConfig(exclude=("b",))), ["a"], [])
