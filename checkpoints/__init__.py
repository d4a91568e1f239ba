"""Atomic, verified checkpoints of dicts of tensors / arrays / JSON (DESIGN.md §5).

A leaf package: it knows nothing about models, Kafka or monitors. Callers hand it
``{component_name: state_dict}`` plus the Kafka offsets and watermark of the cut.
"""

from .compare import state_differences
from .config import CheckpointConfig
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointLockedError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    NoIntactCheckpointError,
    Skipped,
)
from .ledger import LEDGER_COMPONENT, LedgerChain, LedgerLink, ledger_chain, ledger_ids, ledger_state
from .manifest import Manifest, checkpoint_name
from .reader import Checkpoint, CheckpointStatus
from .store import CheckpointInfo, CheckpointStore, Resolution, RollbackResult
from .trigger import CheckpointTrigger

__all__ = [
    "LEDGER_COMPONENT",
    "Checkpoint",
    "CheckpointConfig",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointLockedError",
    "CheckpointNotFoundError",
    "CheckpointStatus",
    "CheckpointStore",
    "CheckpointTrigger",
    "CheckpointWriteError",
    "LedgerChain",
    "LedgerLink",
    "Manifest",
    "NoIntactCheckpointError",
    "Resolution",
    "RollbackResult",
    "Skipped",
    "checkpoint_name",
    "ledger_chain",
    "ledger_ids",
    "ledger_state",
    "state_differences",
]
