"""Operator view of a running daemon: a rich live line on a terminal, JSON log lines otherwise."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.text import Text

log = logging.getLogger("streamtrain.status")


def status_line(status: dict[str, Any]) -> str:
    gate = status.get("gate", {}).get("state", "?")
    counters = status.get("counters", {})
    dlq = sum(v for k, v in counters.items() if k.startswith("dlq."))
    lag = sum(status.get("lag", {}).values())
    losses = status.get("losses", {})
    return (f"gate={gate.upper()} samples={status.get('samples_trained', 0):,} "
            f"({status.get('samples_per_s', 0.0):,.0f}/s) events={counters.get('messages', 0):,} dlq={dlq:,} "
            f"lag={lag:,} loss={losses.get('total', float('nan')):.4f} ckpt={status.get('last_checkpoint')} "
            f"version={status.get('current_version')}")


class StatusView:
    """Renders ``status()`` every ``interval`` seconds until ``stop()``."""

    def __init__(self, status: Callable[[], dict[str, Any]], *, interval: float = 1.0, log_interval: float = 30.0,
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
                if status.get("state") == "running":
                    log.info(status_line(status), extra={"samples_trained": status.get("samples_trained"),
                                                         "gate": status.get("gate", {}).get("state")})
            return
        with Live(Text("starting..."), console=Console(stderr=True), refresh_per_second=4, transient=False) as live:
            while not self._stop.wait(self._interval):
                live.update(Text(status_line(self._status())))
