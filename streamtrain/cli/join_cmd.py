"""`streamtrain join`: run the consumer side alone (events -> Arrow sample batches)."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from streamtrain.cli.common import add_config_flags, config_from_args, print_json, stop_event_on_signals


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "join", help="consume events, join labels, produce Arrow IPC sample batches (no training)",
        description="Runs decode + validate + label join + features + negatives and produces each sample batch as "
                    "an Arrow IPC message to the samples topic (kafka.samples_topic, or --to). Bad input goes to the "
                    "DLQ topic. At-least-once: commits the oldest offset the joiner still needs and resumes from the "
                    "group's committed offsets. Runs until SIGTERM/Ctrl-C.")
    add_config_flags(parser)
    parser.add_argument("--to", metavar="TOPIC", help="samples topic (default: kafka.samples_topic)")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.set_defaults(func=_join)


def _join(args: argparse.Namespace) -> int:
    from consumers.runtime import run_join

    config = config_from_args(args)
    summary = run_join(config.ingest(), stop_event_on_signals(), to_topic=args.to or config.kafka.samples_topic)
    doc = dataclasses.asdict(summary)
    if args.json:
        print_json(doc)
    else:
        print(" ".join(f"{k}={v}" for k, v in doc.items() if k != "counters"), file=sys.stderr)
    return 0
