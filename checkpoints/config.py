"""Configuration of the checkpoint store and of the checkpoint trigger."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


class CheckpointConfig(BaseModel):
    """How often to checkpoint, how many to keep, and how hard to insist on durability."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Where the daemon opens its store. The store itself takes the root as an argument so
    # that CLI tools can open any root without a config file.
    root: Path = Path("runs/default/checkpoints")
    # Samples trained between checkpoints: bounds the replay work after a crash
    # (at ~20k samples/s this is a few seconds of training). None: no sample cadence.
    every_samples: int | None = Field(default=100_000, ge=1)
    # Wall-clock bound between checkpoints, so thin traffic still gets saved.
    # None: no time cadence. Only ever checked at batch boundaries.
    every_seconds: float | None = Field(default=300.0, gt=0)
    # Newest checkpoints kept: several fallbacks in case the newest is damaged.
    keep_last: int = Field(default=5, ge=1)
    # Days (counting today, UTC) whose daily warm-start checkpoint is kept: one week.
    keep_daily: int = Field(default=7, ge=0)
    # fsync files and directories. Without it a power loss can leave LATEST naming a
    # checkpoint whose bytes never reached the disk; turn off only for tests/benchmarks.
    fsync: bool = True
    # First wait after a failed write before the trigger asks again: long enough not to
    # hammer a full disk, short enough that an operator's fix is picked up quickly.
    retry_backoff_seconds: float = Field(default=30.0, gt=0)
    # The wait doubles after each consecutive failure up to this cap.
    retry_backoff_max_seconds: float = Field(default=600.0, gt=0)

    @model_validator(mode="after")
    def _backoff_ordered(self) -> CheckpointConfig:
        if self.retry_backoff_max_seconds < self.retry_backoff_seconds:
            raise ValueError("retry_backoff_max_seconds must be >= retry_backoff_seconds")
        return self
