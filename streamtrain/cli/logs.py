"""Logging: human lines on a terminal, one JSON object per line otherwise (for log shippers).

On a terminal, log lines go through the one stderr :func:`console` that the live status
panel also draws on (``streamtrain/runtime/live.py``): rich then prints every line above
the panel, instead of a line glued to the panel's last frame.
"""

from __future__ import annotations

import logging
import sys
import time
from functools import cache

import orjson
from rich.console import Console
from rich.logging import RichHandler

_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update({k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


@cache
def console() -> Console:
    """The process's stderr console (made on first use: rich reads the terminal's size and
    colour support from the environment then, never at import)."""
    return Console(stderr=True)


def live_console() -> Console | None:
    """The console a live view may draw on: :func:`console` when log records go through it
    (text logs on a terminal), else None (JSON or piped logs would tear a live region)."""
    through = any(isinstance(h, RichHandler) and h.console is console() for h in logging.getLogger().handlers)
    return console() if through else None


def setup_logging(level: str = "INFO", json_logs: bool | None = None) -> None:
    """Configure the root logger once. ``json_logs=None`` picks JSON when stderr is not a TTY.

    Text on a terminal goes through :func:`console` (time, level, logger, message in
    columns); text to a file or a pipe stays one plain line per record, unwrapped.
    """
    if json_logs is None:
        json_logs = not sys.stderr.isatty()
    handler: logging.Handler
    if json_logs:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif console().is_terminal:
        handler = RichHandler(console=console(), show_path=False, markup=False, rich_tracebacks=False,
                              omit_repeated_times=False, log_time_format="%H:%M:%S")
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("faust", "faiss.loader"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
