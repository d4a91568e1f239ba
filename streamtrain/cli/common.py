"""Helpers shared by CLI commands: config flags, JSON output, waiting for a signal."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import orjson

from streamtrain.config import StreamtrainConfig, load_config


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML config file (defaults < file < STREAMTRAIN_* env < --set)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config value (repeatable), e.g. --set trainer.batch_size=512")


def config_from_args(args: argparse.Namespace) -> StreamtrainConfig:
    return load_config(args.config, overrides=args.overrides)


def print_json(doc: Any) -> None:
    """One JSON object on one line (the last line of output, for machines)."""
    sys.stdout.write(orjson.dumps(doc, default=str).decode() + "\n")
    sys.stdout.flush()


def stop_event_on_signals() -> threading.Event:
    """An event set by SIGINT/SIGTERM; a second signal exits at once (hard stop)."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            raise SystemExit(128 + signum)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop
