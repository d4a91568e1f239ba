"""Joining the process group of a scale-out run, the way ``torchrun`` describes it.

A rank learns who it is from the environment ``torchrun`` (and ``streamtrain run
--workers N``, see :mod:`streamtrain.distributed.launcher`) sets: ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``. The rendezvous store
is hosted by the launcher (``TORCHELASTIC_USE_AGENT_STORE=True``, torchrun's own
convention), so no rank listens for it. Backend: NCCL when training on CUDA, gloo on
CPU (plus a gloo group for control data either way, :class:`~streamtrain.distributed.comm.Comm`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from streamtrain.distributed.comm import Comm

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Membership:
    """Who this process is in the run (torchrun's variables)."""

    rank: int
    world: int
    local_rank: int

    @staticmethod
    def from_env(environ: Mapping[str, str] = os.environ) -> Membership:
        missing = [name for name in ENV_VARS if name not in environ]
        if missing:
            raise ValueError(f"a scale-out rank needs {', '.join(ENV_VARS)} in its environment (torchrun sets them); "
                             f"missing {', '.join(missing)}")
        rank, world = int(environ["RANK"]), int(environ["WORLD_SIZE"])
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}")
        return Membership(rank, world, int(environ["LOCAL_RANK"]))


def training_device(setting: torch.device, local_rank: int) -> torch.device:
    """One GPU per local rank when training on CUDA."""
    if setting.type != "cuda":
        return setting
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def connect(member: Membership, device: torch.device, timeout_s: float) -> Comm:
    """Join the process group (blocks until every rank has). ``timeout_s`` bounds every
    collective: a rank waiting on a stalled peer fails after it, and its launcher restarts
    the group from the last checkpoint."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=member.rank, world_size=member.world,
                            timeout=timedelta(seconds=timeout_s))
    cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if backend == "nccl" else None
    return Comm(member.rank, member.world, group=dist.group.WORLD, cpu_group=cpu_group, device=device)


def disconnect() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
