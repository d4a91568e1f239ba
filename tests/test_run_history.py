"""The run history the daemon writes for `streamtrain report`: bounded files, what a
replay leaves, events from consecutive snapshots, and the gate's freeze causes."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, Histogram

from monitors.verdict import Verdict
from streamtrain.report.curves import CurveWriter, read_curves
from streamtrain.report.history import load_history, read_rows
from streamtrain.runtime.metric_points import freeze_causes, metric_points
from streamtrain.runtime.status import DaemonStatus, VersionStatus
from streamtrain.runtime.timeseries import BoundedJsonLines, TimeSeries


def _ids(path: Path) -> list[int]:
    return [row["t"] for row in read_rows(path)]


def test_thinned_file_stays_bounded_and_evenly_spaced_over_the_whole_run(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    for t in range(20_000):
        if t % 5000 == 0:  # a restarted daemon reopens the file: the thinning needs no state
            file = BoundedJsonLines(path, 64, thin_by="t")
        file.append({"t": t})
        assert file.rows <= 64
    ids = _ids(path)
    assert ids[0] == 0 and ids[-1] == 19_999, "the first and the newest rows survive"
    old = [t for t in ids if t < ids[-1] - 64]  # rows older than the last compaction
    gaps = [b - a for a, b in zip(old, old[1:])]
    median = sorted(gaps)[len(gaps) // 2]
    assert len(old) >= 16 and max(gaps) <= 2 * median, f"old rows evenly spaced, not thinned again and again: {ids}"


def test_rolled_file_keeps_the_newest_rows(tmp_path: Path) -> None:
    file = BoundedJsonLines(tmp_path / "e.jsonl", 8, thin_by=None)
    for t in range(21):
        file.append({"t": t})
    ids = _ids(tmp_path / "e.jsonl")
    assert len(ids) <= 8 and ids == list(range(ids[0], 21))


def test_a_torn_last_line_is_cut_before_appending(tmp_path: Path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_bytes(b'{"t": 0}\n{"t": 1}\n{"t": 2, "tor')  # a crash mid-write
    file = BoundedJsonLines(path, 100, thin_by="t")
    assert file.rows == 2
    file.append({"t": 3})
    assert _ids(path) == [0, 1, 3]


def _status(samples: int, **kw: object) -> DaemonStatus:
    return DaemonStatus(state=str(kw.pop("state", "running")), topic="events", samples_trained=samples, **kw)  # type: ignore[arg-type]


def _histogram() -> Histogram:
    return Histogram("f_seconds", "f", registry=CollectorRegistry())


def test_turns_write_status_rows_at_most_once_per_interval_and_events_on_change(tmp_path: Path) -> None:
    now = [1000.0]
    series = TimeSeries(tmp_path, status_every_s=1.0, clock=lambda: now[0])
    fresh = _histogram()
    series.turn(_status(0, state="starting", last_checkpoint="ckpt-1"), {"freshness": fresh})
    for step in range(1, 11):  # ten turns in 0.5 s steps: five rows, plus the first
        now[0] += 0.5
        fresh.observe(2.0)
        gate = {"state": "frozen" if step >= 5 else "open",
                "last_transition": {"seq": 1, "from": "open", "to": "frozen", "reason": "auc: AUC 0.51 < floor",
                                    "monitors": ["auc"], "manual": False} if step >= 5 else None}
        series.turn(_status(step * 100, gate=gate, gate_transitions=1 if step >= 5 else 0,
                            checkpoints_written=1 if step >= 4 else 0, last_checkpoint="ckpt-2" if step >= 4 else "ckpt-1",
                            current_version=VersionStatus("v000001", 1, 5.0) if step >= 8 else None),
                    {"freshness": fresh})
    series.turn(_status(1000, state="stopped"), {"freshness": fresh})
    history = load_history(tmp_path)
    # a row a second, and one in the turn the gate froze (500, between two due rows), and the last
    assert [r["samples"] for r in history.status] == [0, 200, 400, 500, 700, 900, 1000]
    assert history.status[2]["samples_per_s"] == pytest.approx(200.0)  # 200 samples in 1 s
    assert history.status[2]["freshness_s"] == pytest.approx(2.0)
    assert [r["gate"] for r in history.status][-3:-1] == ["frozen", "frozen"]
    kinds = [(e["kind"], e["samples"]) for e in history.events]
    assert kinds == [("start", 0), ("checkpoint", 400), ("gate", 500), ("version", 800)]
    assert history.events[0]["resumed_from"] == "ckpt-1", "the restored checkpoint is not a new one"
    assert history.events[2]["reason"] == "auc: AUC 0.51 < floor"


def test_a_replay_keeps_the_rows_it_rewrote_once(tmp_path: Path) -> None:
    now = [0.0]

    def run(samples: list[int], windows: list[int]) -> None:
        series = TimeSeries(tmp_path, status_every_s=0.0, clock=lambda: now[0])
        for s in samples:
            now[0] += 1
            series.turn(_status(s), {})
        for w in windows:
            series.window(Verdict("auc", w, (w + 1) * 100, True, True, False, False, {"auc/ctr": 0.6 + w / 100}),
                          samples=(w + 1) * 100, ts_ms=None)

    run([0, 100, 200, 300, 400], [0, 1, 2, 3])  # killed after 400 samples; its last checkpoint was at 200
    run([200, 300, 400, 500], [2, 3, 4])  # the restart replays 200..400, then goes on
    history = load_history(tmp_path)
    assert [r["samples"] for r in history.status] == [0, 100, 200, 300, 400, 500]
    assert [r["window"] for r in history.windows["auc"]] == [0, 1, 2, 3, 4]
    assert [e["kind"] for e in history.events] == ["start", "start"]


def test_window_rows_keep_only_the_metrics_the_report_draws(tmp_path: Path) -> None:
    series = TimeSeries(tmp_path)
    series.window(Verdict("feature_drift", 3, 4000, True, False, True, False,
                          {"psi/item.price": 0.4, "js/item.price": 0.1, "repeat_rate/item.price": float("nan")},
                          reason="item.price PSI 0.400 > 0.25"), samples=4100, ts_ms=1_767_225_600_000)
    row = load_history(tmp_path).windows["feature_drift"][0]
    assert row["metrics"] == {"psi/item.price": 0.4}
    assert (row["rows"], row["samples"], row["alarm"], row["reason"]) == (4000, 4100, True, "item.price PSI 0.400 > 0.25")


def test_a_failing_disk_drops_rows_and_never_raises(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    series = TimeSeries(blocker)
    for samples in (0, 100):
        series.turn(_status(samples), {})
    assert caplog.text.count("run history not written") == 1


def test_reference_curves_round_trip_and_skip_junk(tmp_path: Path) -> None:
    CurveWriter(tmp_path / "oracle.jsonl", "oracle").append(5000, 0.93, float("nan"))
    with open(tmp_path / "baselines.jsonl", "wb") as f:
        f.write(orjson.dumps({"name": "online_mf", "rows": 10000, "auc_ctr": 0.7}) + b"\n")
        f.write(b"not json\n")
        f.write(orjson.dumps({"name": "online_mf", "rows": 5000, "auc_ctr": 0.65}) + b"\n")
    curves = read_curves(tmp_path)
    assert list(curves) == ["oracle", "online_mf"]
    assert curves["oracle"] == [{"name": "oracle", "rows": 5000, "auc_ctr": 0.93, "auc_ctcvr": None}]
    assert [p["rows"] for p in curves["online_mf"]] == [5000, 10000]


@pytest.mark.parametrize(("gate", "holding"), [
    ({"state": "open", "alarms": {}}, set()),
    ({"state": "frozen", "alarms": {"auc": "AUC 0.51 < floor"}}, {"auc"}),
    ({"state": "frozen", "alarms": {"auc": "x"}, "manual_freeze": True}, {"auc", "operator"}),
    ({"state": "frozen", "alarms": {"auc": "x"}, "acknowledged": ["auc"], "manual_freeze": True}, {"operator"}),
    ({"state": "frozen", "alarms": {}}, {"awaiting_unfreeze"}),  # cleared under unfreeze: manual
])
def test_freeze_causes(gate: dict, holding: set[str]) -> None:
    suite = {"monitors": {"auc": {}, "label_ratio": {}, "feature_drift": {}}}
    causes = freeze_causes(gate, suite)
    assert set(causes) == {"auc", "label_ratio", "feature_drift", "operator", "awaiting_unfreeze"}
    assert {c for c, held in causes.items() if held} == holding
    points = [p for p in metric_points(_status(0, gate=gate, monitors=suite)) if p.name == "streamtrain_gate_frozen_by"]
    assert {p.labels["cause"] for p in points if p.value == 1.0} == holding


def test_every_dlq_reason_is_exported_from_the_start() -> None:
    from consumers.reasons import Reason

    points = [p for p in metric_points(_status(0, counters={"dlq.not_json": 3})) if p.name == "streamtrain_dlq_events"]
    assert {p.labels["reason"] for p in points} == {r.value for r in Reason}
    assert {p.labels["reason"]: p.value for p in points if p.value} == {"not_json": 3}
