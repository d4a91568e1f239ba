"""Single monitors on hand-built windows: warm-up, hysteresis, each check's rule, state checks,
config validation, and the leaf-package import rule."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from monitors import (
    AlertConfig,
    AucMonitor,
    AucMonitorConfig,
    FeatureDriftMonitor,
    FeatureDriftMonitorConfig,
    GateConfig,
    Hysteresis,
    IncompatibleStateError,
    LabelRatioMonitor,
    LabelRatioMonitorConfig,
    ScoredBatch,
    Verdict,
)


def batch(
    click: np.ndarray,
    convert: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    sparse: np.ndarray | None = None,
) -> ScoredBatch:
    n = len(click)
    scores = np.full(n, 0.1) if scores is None else scores
    return ScoredBatch.from_arrays(
        scores,
        scores * 0.5,
        click,
        np.zeros(n) if convert is None else convert,
        np.zeros((n, 0), np.int64) if sparse is None else sparse,
        np.zeros((n, 0), np.float32),
    )


def window_with_clicks(size: int, clicks: int, conversions: int = 0) -> ScoredBatch:
    click = np.arange(size) < clicks
    return batch(click, np.arange(size) < conversions)


# -- hysteresis ---------------------------------------------------------------------


def test_hysteresis_needs_consecutive_bad_to_raise_and_consecutive_good_to_clear() -> None:
    h = Hysteresis(alarm_after=2, clear_after=3)
    pattern = [True, False, True, False, True, True, False, False, True, False, False, False]
    assert [h.step(bad) for bad in pattern] == [
        False, False, False, False, False, True, True, True, True, True, True, False,
    ]


def test_label_ratio_hysteresis_counts_windows_and_freezes_the_baseline_while_alarmed() -> None:
    cfg = LabelRatioMonitorConfig(window=1000, warmup_windows=1, alarm_after=2, clear_after=3)
    monitor = LabelRatioMonitor(cfg)
    (reference,) = monitor.update(window_with_clicks(1000, 100))
    assert reference.warming_up and not reference.judged and reference.ok
    bad, good, near = (window_with_clicks(1000, c) for c in (300, 100, 110))
    verdicts = [monitor.update(w)[0] for w in [bad, good, bad, bad, near, near, near, near]]
    assert [v.ok for v in verdicts] == [False, True, False, False, True, True, True, True]
    assert [v.alarm for v in verdicts] == [False, False, False, True, True, True, False, False]
    # good windows inside the alarm (4, 5) are not learnt; the clearing window (6) is
    assert [v.metrics["baseline/ctr"] for v in verdicts[:7]] == [0.1] * 7
    assert verdicts[7].metrics["baseline/ctr"] == pytest.approx(0.9 * 0.1 + 0.1 * 0.11)
    assert "CTR 0.3000 vs baseline 0.1000" in verdicts[3].reason


def test_label_ratio_baseline_follows_good_windows_only() -> None:
    monitor = LabelRatioMonitor(LabelRatioMonitorConfig(window=1000, warmup_windows=1, baseline_alpha=0.5))
    monitor.update(window_with_clicks(1000, 100))
    monitor.update(window_with_clicks(1000, 120))  # +20%: good, adapted into the baseline
    monitor.update(window_with_clicks(1000, 400))  # bad: must not move it
    (after,) = monitor.update(window_with_clicks(1000, 110))
    assert after.metrics["baseline/ctr"] == pytest.approx(0.11)


@pytest.mark.parametrize("rule, bad", [("all", False), ("any", True)])
def test_label_ratio_rule_combines_relative_and_statistical_tests(rule: str, bad: bool) -> None:
    # +10% on 10k samples: significant (z = 3.3 > 3) but not material (< 30%)
    cfg = LabelRatioMonitorConfig(window=10_000, warmup_windows=1, z_threshold=3.0, rule=rule)
    monitor = LabelRatioMonitor(cfg)
    monitor.update(window_with_clicks(10_000, 1000))
    (verdict,) = monitor.update(window_with_clicks(10_000, 1100))
    assert verdict.metrics["z/ctr"] == pytest.approx(3.33, abs=0.01)
    assert verdict.ok is not bad


def test_label_ratio_does_not_judge_cvr_without_reference_conversions() -> None:
    monitor = LabelRatioMonitor(LabelRatioMonitorConfig(window=1000, warmup_windows=1, min_events=30))
    monitor.update(window_with_clicks(1000, 100, conversions=5))
    (verdict,) = monitor.update(window_with_clicks(1000, 100, conversions=90))
    assert math.isnan(verdict.metrics["baseline/cvr"]) and verdict.metrics["rate/cvr"] == 0.9
    assert verdict.ok and verdict.judged


def test_windows_split_batches_at_exact_sample_counts() -> None:
    monitor = LabelRatioMonitor(LabelRatioMonitorConfig(window=1000, warmup_windows=1))
    verdicts = monitor.update(window_with_clicks(2500, 250))
    assert [v.sample_count for v in verdicts] == [1000, 2000]
    assert monitor.update(window_with_clicks(500, 0))[0].sample_count == 3000


# -- feature drift --------------------------------------------------------------------


def test_constant_value_of_a_near_unique_feature_is_caught_by_the_repeat_rate() -> None:
    rng = np.random.default_rng(0)
    cfg = FeatureDriftMonitorConfig(window=2000, warmup_windows=1, alarm_after=1)
    monitor = FeatureDriftMonitor(cfg, ["user.id"], [])
    unique_ids = rng.integers(1, 2**62, size=(2000, 1))  # top-k holds ~0 mass: all "other"
    monitor.update(batch(np.zeros(2000), sparse=unique_ids))
    (clean,) = monitor.update(batch(np.zeros(2000), sparse=rng.integers(1, 2**62, size=(2000, 1))))
    (stuck,) = monitor.update(batch(np.zeros(2000), sparse=np.full((2000, 1), 42)))
    assert clean.ok and clean.metrics["repeat_rate/user.id"] == 0.0
    assert stuck.metrics["psi/user.id"] < 0.05  # far under max_psi: the histogram alone cannot see it
    assert not stuck.ok and stuck.alarm and "constant value?" in stuck.reason


def test_feature_monitor_reports_missing_rate_and_excludes_features() -> None:
    cfg = FeatureDriftMonitorConfig(window=1000, warmup_windows=1, exclude=("item.noise",))
    monitor = FeatureDriftMonitor(cfg, ["item.cat", "item.noise"], [])
    assert monitor.features == ["item.cat"]
    values = np.repeat(np.tile(np.arange(1, 11), 100)[:, None], 2, axis=1)  # (1000, 2)
    monitor.update(batch(np.zeros(1000), sparse=values))
    values[:500, 0] = 0
    (verdict,) = monitor.update(batch(np.zeros(1000), sparse=values))
    assert verdict.metrics["missing_rate/item.cat"] == 0.5
    assert "missing 50% (reference 0%)" in verdict.reason
    assert not any(k.endswith("item.noise") for k in verdict.metrics)


# -- AUC ------------------------------------------------------------------------------


def scored(rng: np.random.Generator, n: int, separation: float, scale: float = 1.0) -> ScoredBatch:
    """CTR ~20%, CTCVR ~0.2%; scores are a calibrated-ish monotone map of a noisy signal."""
    click = rng.random(n) < 0.2
    score = 1 / (1 + np.exp(-(click * separation + rng.normal(size=n) - 1.9)))
    convert = click & (rng.random(n) < 0.01)
    return batch(click, convert, scores=np.clip(score * scale, 0, 1))


def auc_monitor() -> AucMonitor:
    return AucMonitor(AucMonitorConfig(window=5000, warmup_windows=1, alarm_after=1))


def test_auc_drop_from_baseline_is_bad_above_the_floor() -> None:
    rng = np.random.default_rng(1)
    monitor = auc_monitor()
    monitor.update(scored(rng, 5000, 0.95))
    (good,) = monitor.update(scored(rng, 5000, 0.95))
    (worse,) = monitor.update(scored(rng, 5000, 0.6))
    assert good.ok and good.metrics["auc/ctr"] == pytest.approx(0.75, abs=0.02)
    assert worse.metrics["auc/ctr"] > monitor.config.min_auc
    assert not worse.ok and "dropped" in worse.reason and "floor" not in worse.reason


def test_auc_judges_ctcvr_only_with_enough_conversions() -> None:
    rng = np.random.default_rng(2)
    monitor = auc_monitor()
    monitor.update(scored(rng, 5000, 0.95))
    (verdict,) = monitor.update(scored(rng, 5000, 0.95))
    assert verdict.metrics["positives/ctcvr"] < monitor.config.min_positives
    assert verdict.judged and verdict.ok and verdict.reason == ""
    assert math.isnan(verdict.metrics["auc_baseline/ctcvr"])


def test_auc_flags_miscalibration_and_non_finite_scores() -> None:
    rng = np.random.default_rng(3)
    monitor = auc_monitor()
    monitor.update(scored(rng, 5000, 0.95))
    (inflated,) = monitor.update(scored(rng, 5000, 0.95, scale=3.0))
    assert inflated.metrics["calibration/ctr"] > 2 and "calibration" in inflated.reason
    broken = scored(rng, 5000, 0.95)
    broken.scores_ctr[:3] = np.nan
    (nan_window,) = monitor.update(broken)
    assert nan_window.metrics["nonfinite/ctr"] == 3 and "ctr: 3 non-finite scores" in nan_window.reason


# -- state and config -----------------------------------------------------------------


def test_state_with_another_layout_or_format_is_refused() -> None:
    state = LabelRatioMonitor(LabelRatioMonitorConfig(window=1000)).state_dict()
    with pytest.raises(IncompatibleStateError, match="window"):
        LabelRatioMonitor(LabelRatioMonitorConfig(window=2000)).load_state_dict(state)
    with pytest.raises(IncompatibleStateError, match="format"):
        LabelRatioMonitor(LabelRatioMonitorConfig(window=1000)).load_state_dict({**state, "format_version": 99})
    features = FeatureDriftMonitor(FeatureDriftMonitorConfig(), ["a"], []).state_dict()
    with pytest.raises(IncompatibleStateError, match="sparse_features"):
        FeatureDriftMonitor(FeatureDriftMonitorConfig(), ["b"], []).load_state_dict(features)


def test_verdict_to_dict_is_json_ready() -> None:
    v = Verdict("auc", 0, 10, True, True, False, False, {"auc/ctr": math.nan, "auc/ctcvr": 0.7})
    assert v.to_dict()["metrics"] == {"auc/ctr": None, "auc/ctcvr": 0.7}


@pytest.mark.parametrize(
    "build",
    [
        lambda: LabelRatioMonitorConfig(max_relative_deviation=None, z_threshold=None),
        lambda: FeatureDriftMonitorConfig(max_psi=None),
        lambda: AucMonitorConfig(calibration_range=(1.5, 2.0)),
        lambda: GateConfig(freeze_on=("label_ratio", "psi")),
        lambda: GateConfig(on_freeze="pause"),  # with the default unfreeze="auto"
        lambda: AlertConfig(webhook_urls=("ftp://x",)),
        lambda: LabelRatioMonitorConfig(windw=10),  # type: ignore[call-arg]
    ],
)
def test_config_rejects_contradictions_and_unknown_keys(build) -> None:  # noqa: ANN001
    with pytest.raises(ValidationError):
        build()


def test_config_is_frozen() -> None:
    cfg = AucMonitorConfig()
    with pytest.raises(ValidationError):
        cfg.min_auc = 0.1  # type: ignore[misc]


def test_monitors_is_a_leaf_package() -> None:
    root = Path(__file__).resolve().parents[1] / "monitors"
    imported = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    assert imported, "walked no imports"
    assert not imported & {"streamtrain", "consumers", "checkpoints"}
