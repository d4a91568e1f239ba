"""The `streamtrain` command line. Exit codes: 0 ok, 1 runtime failure, 2 usage/config error."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from streamtrain import __version__
from streamtrain.cli import (
    checkpoints_cmd,
    config_cmd,
    demo_cmd,
    eval_cmd,
    exit_codes,
    gate_cmd,
    join_cmd,
    publish_cmd,
    replay_cmd,
    report_cmd,
    run_cmd,
    services_cmd,
    simulate_cmd,
    stats_cmd,
)
from streamtrain.cli.exit_codes import InputError
from streamtrain.config import ConfigError
from streamtrain.cli.logs import setup_logging
from checkpoints import CheckpointError
from streamtrain.runtime.publisher import PublishError
from streamtrain.services import ServiceError

log = logging.getLogger("streamtrain")

COMMANDS = (demo_cmd, run_cmd, report_cmd, join_cmd, replay_cmd, eval_cmd, config_cmd, services_cmd, simulate_cmd,
            checkpoints_cmd, gate_cmd, publish_cmd, stats_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamtrain",
        description="Streaming, incremental training of recommender models from Kafka events.",
        epilog="Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error. "
               "Run `streamtrain COMMAND --help` for each command.",
    )
    parser.add_argument("--version", action="version", version=f"streamtrain {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default="auto", choices=["auto", "text", "json"],
                        help="auto: text on a terminal, JSON lines otherwise")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, None if args.log_format == "auto" else args.log_format == "json")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return exit_codes.USAGE
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    except (ServiceError, PublishError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exit_codes.RUNTIME_FAILURE
    except KeyboardInterrupt:
        return exit_codes.RUNTIME_FAILURE


if __name__ == "__main__":
    sys.exit(main())
