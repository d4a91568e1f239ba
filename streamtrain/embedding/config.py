"""Configuration of one dynamic embedding table (frozen, unknown keys rejected)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AdmissionConfig(_Section):
    """When an unseen key earns a trained row (count-min sketch of occurrences)."""

    min_count: int = Field(2, ge=1)  # one-off ids (bots, typos) are most of a stream's tail: make them show up twice
    sketch_width: int = Field(1 << 20, ge=16)  # 4 rows x 1M int32 = 16 MiB; error ~ e/width of the stream per halving period
    sketch_depth: int = Field(4, ge=1)  # P(over-estimate > e*N/width) <= e^-depth ~ 2 %
    halve_every_n_steps: int = Field(10_000, ge=0)  # ages counts so "seen twice" means recently; 0 = never

    @model_validator(mode="after")
    def _power_of_two(self) -> AdmissionConfig:
        if self.sketch_width & (self.sketch_width - 1):
            raise ValueError(f"sketch_width must be a power of two, got {self.sketch_width}")
        return self


class EvictionConfig(_Section):
    """Which rows leave, when. Event time only: the caller passes ``now_ms``."""

    policy: Literal["none", "lfu", "lru", "ttl"] = "lfu"  # popularity is the best single predictor of reuse in recsys
    every_n_steps: int = Field(1000, ge=0)  # periodic pass: cheap (O(rows)) when amortised; 0 = only when full
    ttl_ms: int = Field(7 * 24 * 3600 * 1000, ge=1)  # ttl policy: a week covers weekly return cycles
    high_watermark: float = Field(0.95, gt=0.0, le=1.0)  # periodic pass trims only above this fill of max_rows
    low_watermark: float = Field(0.90, ge=0.0, lt=1.0)  # ... down to this fill, so a full table is not trimmed every step
    lfu_halve_every_n_steps: int = Field(10_000, ge=0)  # ages LFU counts so yesterday's hits can leave; 0 = never

    @model_validator(mode="after")
    def _watermarks(self) -> EvictionConfig:
        if self.low_watermark >= self.high_watermark:
            raise ValueError("low_watermark must be below high_watermark")
        return self


class RowOptimizerConfig(_Section):
    """Row-wise sparse optimizer; hyper-parameters mean what they mean in ``torch.optim``."""

    kind: Literal["sgd", "adagrad", "adam"] = "adagrad"  # per-coordinate steps suit skewed id frequencies
    # Sparse rows see few updates each: far above a dense lr. Adagrad, CTR AUC on the last 20 % of
    # 100k demo-world exposures with the model defaults: 0.05 → 0.786, 0.1 → 0.812, 0.2 → 0.820;
    # 0.5 did worse than 0.2 in every setting tried. docs/model_quality.md
    lr: float = Field(0.2, gt=0.0)
    eps: float = Field(1e-10, gt=0.0)  # torch.optim.Adagrad's default (Adam's is 1e-8: set it when kind=adam)
    initial_accumulator_value: float = Field(0.0, ge=0.0)  # torch.optim.Adagrad's default
    beta1: float = Field(0.9, ge=0.0, lt=1.0)  # torch.optim.Adam's default
    beta2: float = Field(0.999, ge=0.0, lt=1.0)  # torch.optim.Adam's default


class EmbeddingTableConfig(_Section):
    """One dynamic table: int64 ids -> ``dim`` floats, rows created on admission.

    Capacity: ``initial_rows`` are allocated at start; when they run out the row storage
    grows by ``growth_factor`` up to ``max_rows``, then eviction makes room. Set
    ``initial_rows == max_rows`` for a fixed, hard-capped table.
    """

    name: str = Field("embedding", min_length=1)  # names the table in Redis keys and delta files
    dim: int = Field(64, ge=1)  # the model's width; 64 fp32 = 256 B per row
    initial_rows: int = Field(1 << 16, ge=1)  # 16 MiB of fp32 rows at dim 64: small until the stream proves otherwise
    max_rows: int = Field(1 << 24, ge=1)  # 16M rows x (256 B + optimizer slots) ~ 8 GiB: fits a 24 GiB box
    growth_factor: float = Field(2.0, gt=1.0)  # amortised O(1) copies per row; the slack is at most 1/2 of the rows
    hash_max_load: float = Field(0.5, gt=0.0, lt=1.0)  # linear probing stays ~1.5 probes per hit below 1/2
    init_bound: float = Field(0.05, gt=0.0)  # uniform(-b, b): std 0.029, near the usual 0.02-0.03 for recsys ids
    default_row: Literal["zero", "learned"] = "zero"  # zero: unadmitted ids contribute nothing until they earn a row
    seed: int = 0  # salts row initialisation: same seed, same initial rows, on any device
    # Ablation (bench/ablations.py): N turns the table into a fixed hashed one -- ids are replaced
    # by splitmix64(id) mod N + 1 before the lookup, so colliding ids share a row (keys in deltas and
    # published tables are then bucket numbers). None: one row per admitted id.
    hash_buckets: int | None = Field(None, ge=1)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    eviction: EvictionConfig = Field(default_factory=EvictionConfig)
    optimizer: RowOptimizerConfig = Field(default_factory=RowOptimizerConfig)

    @model_validator(mode="after")
    def _rows(self) -> EmbeddingTableConfig:
        if self.max_rows < self.initial_rows:
            raise ValueError(f"max_rows ({self.max_rows}) must be >= initial_rows ({self.initial_rows})")
        return self
