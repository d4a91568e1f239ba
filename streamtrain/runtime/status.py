"""What a running daemon looks like from outside, as one immutable snapshot per loop turn.

The loop builds a :class:`DaemonStatus` after every turn; ``GET /status``, the live view
and ``/metrics`` all read that snapshot (never the daemon itself), so they are consistent
with each other and need no locks on training state.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class TableStatus:
    """One dynamic embedding table."""

    rows: int  # keys that have a row
    load_factor: float  # rows / max_rows
    counters: dict[str, int]  # TableCounters as a dict


@dataclass(frozen=True)
class VersionStatus:
    """The CURRENT published version."""

    name: str
    number: int
    created: float  # unix seconds


@dataclass(frozen=True)
class DaemonStatus:
    state: str  # starting | running | stopped
    topic: str
    steps: int = 0
    samples_trained: int = 0
    samples_per_s: float = 0.0  # since this process started
    losses: dict[str, float] = field(default_factory=dict)  # of the last step
    gate: dict[str, Any] = field(default_factory=dict)  # Gate.status()
    gate_transitions: int = 0
    monitors: dict[str, Any] = field(default_factory=dict)  # MonitorSuite.status()
    offsets: dict[str, dict[int, int]] = field(default_factory=dict)  # {topic: {partition: next offset}}
    lag: dict[int, int] = field(default_factory=dict)  # {partition: messages behind the end}
    watermark: int | None = None  # joiner event-time watermark, ms
    counters: dict[str, int] = field(default_factory=dict)  # pipeline counters (dlq.<reason>, joiner, ...)
    held: dict[str, int] = field(default_factory=dict)  # IngestPipeline.held: pending/buffered/quarantined
    tables: dict[str, TableStatus] = field(default_factory=dict)
    last_checkpoint: str | None = None
    last_checkpoint_wall: float | None = None  # unix seconds of its commit, by this process
    checkpoints_written: int = 0  # by this process
    checkpoint_failures: int = 0  # by this process
    dead_polls: int = 0  # polls of this process whose messages mostly went to the DLQ
    current_version: VersionStatus | None = None
    releases: dict[str, int] = field(default_factory=dict)  # released, held, rollbacks, failures
    # keep_rate, lag_alarm (0/1), backlog_s (-1: not measured yet); with down-sampling on also
    # rows_offered, rows_dropped (since the run began: they are checkpointed), rows_held
    overload: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON document: every object key a string (partition numbers included)."""
        return _str_keys(asdict(self))


def _str_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _str_keys(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_str_keys(v) for v in value]
    return value
