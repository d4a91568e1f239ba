"""One rank's process: join the group from torchrun's environment, run the worker, leave."""

from __future__ import annotations

import threading

from streamtrain.config import StreamtrainConfig
from streamtrain.distributed.group import Membership, connect, disconnect, training_device
from streamtrain.distributed.worker import Worker, WorkerSummary
from streamtrain.trainer import pick_device


def run_rank(config: StreamtrainConfig, *, stop: threading.Event, resume_from: str | None = None,
             stop_after_samples: int | None = None, timeout_s: float = 300.0) -> tuple[int, WorkerSummary]:
    """(this rank, its summary) once the run ends; raises when a peer fails."""
    member = Membership.from_env()
    device = training_device(pick_device(config.trainer.device), member.local_rank)
    comm = connect(member, device, timeout_s)
    try:
        worker = Worker(config, comm, device, stop=stop, resume_from=resume_from, stop_after_samples=stop_after_samples)
        return member.rank, worker.run()
    finally:
        disconnect()
