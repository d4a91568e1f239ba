"""``streamtrain run --workers N``: N ranks on this host, started, watched and restarted
together — what ``torchrun --standalone --nproc-per-node N --max-restarts K`` does, with
the rendezvous store bound to 127.0.0.1 (torchrun's listens on every interface).

Each rank is ``python -m streamtrain ... run --distributed`` with torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``, and
``TORCHELASTIC_USE_AGENT_STORE=True``: the store is hosted here, not by rank 0), so a rank
cannot tell this launcher from torchrun. Ranks die with the launcher (``PR_SET_PDEATHSIG``)
and sit in their own process group (a terminal's Ctrl-C reaches the launcher, which
forwards SIGTERM: the ranks agree to stop, write one final checkpoint and exit 0).

Failure handling: when a rank exits non-zero or is killed, the others are SIGKILLed at
once (what they did since the last checkpoint is discarded: the checkpoint plus the
manifest's offsets are the truth) and all N start again, restoring from the last
consistent checkpoint — nothing lost, nothing trained twice, as for one process.
After ``max_restarts`` restarts the launcher gives up and exits 1.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta

import torch.distributed as dist

from streamtrain.services.process import die_with_parent

log = logging.getLogger("streamtrain.launcher")


class LocalRendezvous:
    """One attempt's rendezvous store: a TCPStore server on a loopback socket we bind."""

    def __init__(self, world: int, timeout_s: float) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(max(128, world))
        self.port = int(listener.getsockname()[1])
        self._store: dist.TCPStore | None = dist.TCPStore(
            "127.0.0.1", self.port, world, True, timedelta(seconds=timeout_s), wait_for_workers=False,
            master_listen_fd=listener.fileno())
        listener.detach()  # the store owns the descriptor now and closes it

    def close(self) -> None:
        self._store = None


def rank_environment(base: Mapping[str, str], rank: int, world: int, port: int, attempt: int) -> dict[str, str]:
    return {**base, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": str(attempt),
            "GLOO_SOCKET_IFNAME": base.get("GLOO_SOCKET_IFNAME", "lo")}  # loopback only (DESIGN §6.5)


def launch(argv: Callable[[int], Sequence[str]], workers: int, *, stop: threading.Event, max_restarts: int = 3,
           timeout_s: float = 300.0, poll_s: float = 0.1) -> int:
    """Run ``argv(attempt)`` as ``workers`` ranks until they all exit; returns the exit
    code. Attempt 0 is the first start, later ones restarts (which must resume from the
    last checkpoint, not from a checkpoint named for the first start)."""
    attempt = 0
    while True:
        rendezvous = LocalRendezvous(workers, timeout_s)
        ranks = [subprocess.Popen(list(argv(attempt)), env=rank_environment(os.environ, r, workers, rendezvous.port, attempt),
                                  preexec_fn=die_with_parent) for r in range(workers)]
        try:
            outcome = _supervise(ranks, stop, poll_s)
        finally:
            for proc in ranks:  # a second signal (SystemExit) or any error: no rank outlives us
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
            rendezvous.close()
        if outcome != "failed":
            return 0 if all(p.returncode == 0 for p in ranks) else 1
        attempt += 1
        codes = [p.returncode for p in ranks]
        if attempt > max_restarts:
            log.error("ranks exited with %s; %d restarts spent, giving up", codes, max_restarts)
            return 1
        log.warning("ranks exited with %s: restarting all %d from the last checkpoint (restart %d of %d)",
                    codes, workers, attempt, max_restarts)


def _supervise(ranks: list[subprocess.Popen[bytes]], stop: threading.Event, poll_s: float) -> str:
    """Wait for the ranks: "done" when all exited by themselves, "stopped" after forwarding
    a stop request, "failed" as soon as one failed (the others are killed)."""
    forwarded = False
    while True:
        codes = [p.poll() for p in ranks]
        if stop.is_set() and not forwarded:
            for proc in ranks:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            forwarded = True
        if not forwarded and any(c not in (None, 0) for c in codes):
            for proc in ranks:
                if proc.poll() is None:
                    proc.kill()
            return "failed"
        if all(c is not None for c in codes):
            return "stopped" if forwarded else "done"
        time.sleep(poll_s)
