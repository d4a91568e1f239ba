"""Operator view of a running daemon: a rich live line on a terminal, JSON log lines otherwise."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.text import Text

from streamtrain.runtime.status import DaemonStatus

log = logging.getLogger("streamtrain.status")


def status_line(status: DaemonStatus) -> str:
    gate = status.gate.get("state", "?")
    counters = status.counters
    dlq = sum(v for k, v in counters.items() if k.startswith("dlq."))
    lag = sum(status.lag.values())
    version = status.current_version.name if status.current_version else None
    return (f"gate={gate.upper()} samples={status.samples_trained:,} "
            f"({status.samples_per_s:,.0f}/s) events={counters.get('messages', 0):,} dlq={dlq:,} "
            f"lag={lag:,} loss={status.losses.get('total', float('nan')):.4f} ckpt={status.last_checkpoint} "
            f"version={version}")


class StatusView:
    """Renders ``status()`` every ``interval`` seconds until ``stop()``."""

    def __init__(self, status: Callable[[], DaemonStatus], *, interval: float = 1.0, log_interval: float = 30.0,
                 terminal: bool | None = None) -> None:
        self._status = status
        self._terminal = sys.stderr.isatty() if terminal is None else terminal
        self._interval = interval if self._terminal else log_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="status-view", daemon=True)

    def start(self) -> "StatusView":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        if not self._terminal:
            while not self._stop.wait(self._interval):
                status = self._status()
                if status.state == "running":
                    log.info(status_line(status), extra={"samples_trained": status.samples_trained,
                                                         "gate": status.gate.get("state")})
            return
        with Live(Text("starting..."), console=Console(stderr=True), refresh_per_second=4, transient=False) as live:
            while not self._stop.wait(self._interval):
                live.update(Text(status_line(self._status())))
