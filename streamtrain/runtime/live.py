"""Operator view of a running daemon: a live status panel on a terminal, JSON log lines otherwise.

On a terminal the panel is drawn with rich's ``Live`` on the console the log handler
writes to (the CLI passes its own, ``streamtrain/cli/logs.py``): log lines then scroll
above a panel that stays at the bottom. Any other output keeps one status log line per
``log_interval`` seconds.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
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


def status_panel(status: DaemonStatus) -> Panel:
    """The live view: gate (with why it is frozen), progress, model quality, durable state."""
    counters = status.counters
    dlq = sum(v for k, v in counters.items() if k.startswith("dlq."))
    gate = str(status.gate.get("state", "?")).upper()
    if gate == "FROZEN":
        transition = status.gate.get("last_transition") or {}
        gate_text = Text.assemble(("● FROZEN", "bold red"), f"  {transition.get('reason', '')}")
    else:
        gate_text = Text(f"● {gate}", style="bold green" if gate == "OPEN" else "bold")
    grid = Table.grid(padding=(0, 3))
    for _ in range(4):
        grid.add_column(no_wrap=True)
    grid.add_row(_pair("samples", f"{status.samples_trained:,}  ({status.samples_per_s:,.0f}/s)"),
                 _pair("events", f"{counters.get('messages', 0):,}"), _pair("dlq", f"{dlq:,}"),
                 _pair("lag", f"{sum(status.lag.values()):,}"))
    grid.add_row(_pair("loss", _fmt(status.losses.get("total"), ".4f")), _pair("window AUC", _window_auc(status.monitors)),
                 _pair("checkpoint", status.last_checkpoint or "–"),
                 _pair("version", status.current_version.name if status.current_version else "–"))
    return Panel(Group(gate_text, grid), title=f"streamtrain · {status.state}", title_align="left",
                 subtitle=f"topic {status.topic}", subtitle_align="right", expand=False,
                 border_style="red" if gate == "FROZEN" else "blue")


def _pair(label: str, value: str) -> Text:
    return Text.assemble((f"{label} ", "dim"), (value, "bold"))


def _fmt(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "–"


def _window_auc(monitors: dict[str, Any]) -> str:
    """The last closed AUC window's CTR and CTCVR AUC ("–" before the first)."""
    verdict = (monitors.get("monitors", {}).get("auc") or {}).get("last_verdict") or {}
    metrics = verdict.get("metrics", {})
    if "auc/ctr" not in metrics:
        return "–"
    return f"CTR {_fmt(metrics.get('auc/ctr'), '.3f')} · CTCVR {_fmt(metrics.get('auc/ctcvr'), '.3f')}"


class StatusView:
    """Renders ``status()`` every ``interval`` seconds until ``stop()``."""

    def __init__(self, status: Callable[[], DaemonStatus], *, console: Console | None, interval: float = 1.0,
                 log_interval: float = 30.0) -> None:
        """``console``: the terminal console that log records also go through (live panel),
        or None (a status log line every ``log_interval`` seconds)."""
        self._status = status
        self._console = console
        self._interval = interval if console is not None else log_interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="status-view", daemon=True)

    def start(self) -> "StatusView":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        if self._console is None:
            while not self._stop.wait(self._interval):
                status = self._status()
                if status.state == "running":
                    log.info(status_line(status), extra={"samples_trained": status.samples_trained,
                                                         "gate": status.gate.get("state")})
            return
        # transient: the panel is gone at exit; the command prints its own summary below the logs
        with Live(status_panel(self._status()), console=self._console, refresh_per_second=4, transient=True,
                  redirect_stdout=False, redirect_stderr=False) as live:
            while not self._stop.wait(self._interval):
                live.update(status_panel(self._status()))
