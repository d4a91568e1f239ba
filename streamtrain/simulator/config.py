"""Simulator configuration: the hidden world and the drifts injected into it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DriftKind = Literal["label_shift", "feature_shift", "broken_feature", "concept_shift"]


class DriftSpec(BaseModel):
    """One injected drift, active for exposures ``[at_event, until_event)`` (switching at the
    first request boundary at or after each count: one request's page never mixes worlds)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: DriftKind
    at_event: int = Field(ge=0)  # exposure count at onset
    until_event: int | None = None  # None = never ends
    magnitude: float = 2.0  # label_shift: CTR odds x magnitude; feature_shift: price x magnitude
    feature: str = "item.price"  # broken_feature: which declared feature breaks
    broken_mode: Literal["constant", "garbage"] = "constant"

    @model_validator(mode="after")
    def _ordered(self) -> "DriftSpec":
        if self.until_event is not None and self.until_event <= self.at_event:
            raise ValueError("until_event must be greater than at_event")
        return self


class SimulatorConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = 0  # same seed, same stream, byte for byte
    users: int = Field(2000, ge=1)
    items: int = Field(5000, ge=2)
    factor_dim: int = Field(8, ge=1)  # rank of the hidden user x item affinity
    factor_scale: float = 2.5  # strength of the learnable signal (higher = higher oracle AUC)
    base_ctr: float = Field(0.08, gt=0, lt=1)  # calibrated mean click probability
    base_cvr: float = Field(0.15, gt=0, lt=1)  # calibrated mean conversion probability per click
    popularity_zipf: float = Field(1.05, ge=0)  # item exposure skew (long tail like real catalogues)
    popularity_effect: float = 0.3  # popular items click a little more (log-popularity coefficient)
    hour_effect: float = 0.3  # amplitude of the time-of-day swing in CTR logit
    items_per_request: int = Field(5, ge=1)  # exposures per request (one feed page)
    requests_per_event_second: float = Field(5.0, gt=0)  # event-time traffic density
    click_delay_median_s: float = Field(20.0, gt=0)  # lognormal delays, event time
    convert_delay_median_s: float = Field(600.0, gt=0)
    max_convert_delay_s: float = Field(3600.0, gt=0)  # keep inside the joiner's convert window
    arrival_jitter_ms: float = Field(200.0, ge=0)  # network delay: events arrive slightly out of order
    start_ts_ms: int = 1_767_225_600_000  # 2026-01-01T00:00:00Z: fixed so runs are reproducible
    exposures: int | None = Field(None, ge=1)  # stop after this many exposures; None = forever
    rate: float = Field(0.0, ge=0)  # events per wall second; 0 = as fast as possible
    time_scale: float = Field(0.0, ge=0)  # event seconds per wall second; 0 = no event-time pacing
    bad_fraction: float = Field(0.0, ge=0, le=1)  # malformed events mixed in per valid event
    drifts: list[DriftSpec] = Field(default_factory=list)
