"""A child server process that cannot outlive us.

Three layers keep orphans away: the child gets ``PR_SET_PDEATHSIG`` (the kernel sends it
SIGKILL when we die, even by SIGKILL), ``stop()`` is registered with ``atexit``, and
``stop()`` escalates SIGTERM -> SIGKILL under a bound.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ServiceError(RuntimeError):
    """A service could not start; the message says what to do about it."""


def die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: atexit + stop() still apply
        pass
    os.setpgrp()  # own process group: Ctrl-C in our terminal is ours to forward, not the child's


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def tcp_connectable(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class ManagedProcess:
    """Start ``argv`` with output to ``log_path``; wait until ``ready()`` is true."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, ready: Callable[[], bool], timeout_s: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self._proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                close_fds=True,
            )
        atexit.register(self.stop)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ServiceError(
                    f"{self.name} exited with code {self._proc.returncode} during start; "
                    f"see its log {self.log_path}:\n{self.log_tail()}"
                )
            if ready():
                log.info("%s ready (pid %d, log %s)", self.name, self._proc.pid, self.log_path)
                return
            time.sleep(0.05)
        self.stop()
        raise ServiceError(f"{self.name} not ready after {timeout_s:.0f}s; see its log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def signal(self, sig: int) -> None:
        """Send ``sig`` (e.g. SIGSTOP/SIGCONT to simulate an outage)."""
        if self.running():
            assert self._proc is not None
            self._proc.send_signal(sig)

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; ``timeout_s=0`` sends SIGKILL at once
        (for a server with nothing to flush). Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        atexit.unregister(self.stop)
        if proc.poll() is None:
            if timeout_s > 0:
                proc.send_signal(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                proc.terminate()
                try:
                    proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                proc.kill()  # SIGKILL also ends a SIGSTOPped process
                proc.wait()
        log.info("%s stopped", self.name)
