"""Typed configuration of the monitors, the gate and the alert sinks.

Every default is chosen for the on-call engineer woken at 3 a.m.: a clean stream must
never freeze publication (thresholds sit many standard errors above window noise, and
two consecutive bad windows are needed), while a real breakage (CTR halved or doubled, a
feature gone constant or missing, scores turned to noise) freezes within three windows.
Window sizes are sample counts, never seconds, so a replay reproduces every verdict.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MonitorName = Literal["label_ratio", "feature_drift", "auc"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class WindowedMonitorConfig(_Frozen):
    """Windowing, warm-up and hysteresis shared by every monitor."""

    # all on: each monitor guards a different failure mode
    enabled: bool = True
    # samples per window: at a 5% CTR that is ~1000 clicks, enough for tight rates and AUCs;
    # detection takes at most (alarm_after + 1) windows = 60k samples
    window: int = Field(20_000, ge=100)
    # windows that learn the reference; nothing is judged (so nothing alarms) before
    warmup_windows: int = Field(2, ge=1)
    # consecutive bad windows to raise the alarm: one unlucky window never freezes
    alarm_after: int = Field(2, ge=1)
    # consecutive good windows to clear it: slower than raising, so the gate does not flap
    clear_after: int = Field(3, ge=1)


class LabelRatioMonitorConfig(WindowedMonitorConfig):
    """CTR (clicks / samples) and CVR (conversions / clicks) against an EWMA baseline."""

    # |rate / baseline - 1|: x2 (+100%) and x0.5 (-50%) are far beyond it, diurnal wiggle within a window is not
    max_relative_deviation: float | None = Field(0.3, gt=0)
    # binomial z-score: 4 sigma keeps a false bad window at ~1e-4 even on thin CVR counts
    z_threshold: float | None = Field(4.0, gt=0)
    # "all": bad only if material AND significant (big windows ignore tiny shifts, thin ones ignore noise)
    rule: Literal["all", "any"] = "all"
    # EWMA weight of each good window: follows slow (diurnal) drift, never a step change (bad windows are not learnt)
    baseline_alpha: float = Field(0.1, ge=0, le=1)
    # a rate is judged only if the reference saw this many positives (no CVR verdicts on a conversion-less stream)
    min_events: int = Field(30, ge=1)

    @model_validator(mode="after")
    def _one_test(self) -> LabelRatioMonitorConfig:
        if self.max_relative_deviation is None and self.z_threshold is None:
            raise ValueError("set max_relative_deviation and/or z_threshold")
        return self


class FeatureDriftMonitorConfig(WindowedMonitorConfig):
    """Per declared feature: histogram divergence, missing rate and repeat rate vs the reference.

    Memory: the reference is learnt from raw values, ``warmup_windows * window`` rows of
    8 bytes (sparse) / 4 bytes (dense) per monitored feature (default: 40k rows).
    """

    # sparse buckets learnt on the reference (+ "other" + "missing"): the head carries most of the mass
    top_k: int = Field(20, ge=1)
    # dense quantile bins from the reference: the usual decile binning of PSI
    numeric_bins: int = Field(10, ge=2)
    # the industry "significant shift" mark; sampling noise is ~(buckets - 1) / window ~= 0.001
    max_psi: float | None = Field(0.25, gt=0)
    # Jensen-Shannon (nats, <= ln 2) as an alternative or extra test; off: PSI already covers it
    max_js: float | None = Field(None, gt=0)
    # absolute rise in the share of missing values (an upstream join or producer broke)
    max_missing_rate_increase: float = Field(0.2, gt=0, le=1)
    # absolute rise of "same value as the previous sample": a constant feature reads ~1
    max_repeat_rate_increase: float = Field(0.5, gt=0, le=1)
    # EWMA of good windows into the reference histogram: tracks seasonality over ~50 windows
    reference_alpha: float = Field(0.02, ge=0, le=1)
    # probability floor for empty buckets, so PSI stays finite
    epsilon: float = Field(1e-4, gt=0, lt=0.01)
    # declared features not to monitor (e.g. near-unique ids that have no stable histogram)
    exclude: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_test(self) -> FeatureDriftMonitorConfig:
        if self.max_psi is None and self.max_js is None:
            raise ValueError("set max_psi and/or max_js")
        return self


class AucMonitorConfig(WindowedMonitorConfig):
    """Exact window AUC, log-loss and calibration of the CTR and CTCVR heads (prequential scores)."""

    # absolute floor: below it the model is close to random and must not ship
    min_auc: float = Field(0.55, ge=0, le=1)
    # AUC drop from the recent baseline: 0.05 is a large regression for a ranker ...
    max_drop: float = Field(0.05, gt=0, le=1)
    # ... and it must exceed drop_z Hanley-McNeil standard errors, so thin CTCVR windows do not flap
    drop_z: float = Field(4.0, gt=0)
    # EWMA of good-window AUCs (the "recent best"): ~5 windows of memory, unbiased unlike a max
    baseline_alpha: float = Field(0.2, ge=0, le=1)
    # a head is judged only with this many positives and negatives in the window
    min_positives: int = Field(30, ge=1)
    # mean prediction / observed rate outside this range is a broken model; None disables
    calibration_range: tuple[float, float] | None = (0.5, 2.0)

    @field_validator("calibration_range")
    @classmethod
    def _ordered(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0 < value[0] < 1 < value[1]:
            raise ValueError("calibration_range must be (low, high) with 0 < low < 1 < high")
        return value


class GateConfig(_Frozen):
    """How the gate reacts to monitor alarms."""

    # hold: keep learning, publish nothing (least disruptive; the model keeps up with the stream)
    on_freeze: Literal["hold", "pause", "rollback"] = "hold"
    # auto: reopen once every alarm has cleared, nobody has to be woken for a blip
    unfreeze: Literal["auto", "manual"] = "auto"
    # monitors whose alarm freezes; the others only show in metrics and logs
    freeze_on: tuple[MonitorName, ...] = ("label_ratio", "feature_drift", "auc")

    @model_validator(mode="after")
    def _pause_needs_manual(self) -> GateConfig:
        if self.on_freeze == "pause" and self.unfreeze == "auto":
            raise ValueError(
                "on_freeze='pause' stops consumption, so no new windows arrive and alarms can never clear: "
                "use unfreeze='manual' with it"
            )
        return self


class AlertConfig(_Frozen):
    """Where gate transitions are sent besides the log."""

    # none: logs and metrics only; nothing leaves the host unless configured
    webhook_urls: tuple[str, ...] = ()
    # per HTTP attempt; the POST runs off the training thread anyway
    timeout_s: float = Field(5.0, gt=0)
    # after the first attempt; with the backoff below a dead endpoint is given up after ~15 s of sleeps
    max_retries: int = Field(5, ge=0)
    # first backoff sleep, doubled after every failed attempt
    backoff_initial_s: float = Field(0.5, gt=0)
    # cap on one backoff sleep
    backoff_max_s: float = Field(8.0, gt=0)
    # pending deliveries; beyond it new alerts are dropped (and counted): training never waits
    queue_size: int = Field(256, ge=1)
    # POST an Alertmanager v2 alert list instead of the plain transition JSON
    alertmanager: bool = False
    # label on freeze alerts: a frozen model goes stale for every user
    severity: str = "critical"
    # `instance` label, to tell several trainers apart in one Alertmanager
    instance: str = "streamtrain"
    # re-send firing alerts: Alertmanager resolves an alert it has not heard of for resolve_timeout (5 min)
    repeat_interval_s: float = Field(60.0, gt=0)

    @field_validator("webhook_urls")
    @classmethod
    def _http(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r}: webhook urls must be http:// or https://")
        return urls


class MonitorsConfig(_Frozen):
    """Everything under the ``monitors`` section of the daemon's config."""

    label_ratio: LabelRatioMonitorConfig = LabelRatioMonitorConfig()
    feature_drift: FeatureDriftMonitorConfig = FeatureDriftMonitorConfig()
    auc: AucMonitorConfig = AucMonitorConfig()
    gate: GateConfig = GateConfig()
    alerts: AlertConfig = AlertConfig()
