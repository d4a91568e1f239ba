"""`streamtrain simulate`: produce contract events with a hidden ground truth."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import orjson

from streamtrain.cli.common import add_config_flags, config_from_args, print_json, stop_event_on_signals
from pydantic import ValidationError

from streamtrain.config import ConfigError, format_validation_error
from streamtrain.services.topics import create_topics
from streamtrain.simulator import DriftSpec, JsonlSink, KafkaSink, run_simulation

_FLAG_FIELDS = ("seed", "users", "items", "exposures", "rate", "time_scale", "bad_fraction")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "simulate", help="produce simulated exposure/click/convert events to Kafka (or a file)",
        description="Produce events in the DESIGN.md contract from a hidden world of latent user/item factors, "
                    "popularity and time-of-day effects. Deterministic for a given --seed. Flags override the "
                    "config's `simulator` section.")
    add_config_flags(parser)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--users", type=int)
    parser.add_argument("--items", type=int)
    parser.add_argument("--exposures", type=int, help="stop after this many exposures (default: run until Ctrl-C)")
    parser.add_argument("--rate", type=float, help="events per wall second (0 = as fast as possible)")
    parser.add_argument("--time-scale", type=float, help="event seconds per wall second (0 = no event-time pacing)")
    parser.add_argument("--bad-fraction", type=float, help="malformed events mixed in, per valid event (0..1)")
    parser.add_argument("--drift", action="append", default=[], metavar="kind=K,at=N[,until=M][,magnitude=X][,feature=F][,broken_mode=constant|garbage]",
                        help="inject a drift at exposure N (repeatable); kinds: label_shift, feature_shift, broken_feature, concept_shift")
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap (default: kafka.bootstrap_servers)")
    parser.add_argument("--topic", help="target topic (default: kafka.topic)")
    parser.add_argument("--end-of-input", action="store_true",
                        help="after a complete --exposures run, end every partition with an end-of-input marker: "
                             "a daemon reading the topic trains every sample and exits")
    parser.add_argument("--out", type=Path, help="write JSON lines to this file instead of Kafka")
    parser.add_argument("--truth", type=Path, help="write the ground truth (true pCTR/pCVR per exposure) as JSON lines here")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.set_defaults(func=_simulate)


_DRIFT_ALIASES = {"at": "at_event", "until": "until_event"}


def parse_drift(text: str) -> DriftSpec:
    """``kind=label_shift,at=20000,until=40000,magnitude=2`` -> DriftSpec."""
    fields: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError([f"--drift {text!r}: expected key=value pairs, got {part!r}"])
        fields[_DRIFT_ALIASES.get(key.strip(), key.strip())] = value.strip()
    try:
        return DriftSpec.model_validate(fields)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, DriftSpec, prefix="--drift ")) from None


def _simulate(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    updates = {name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name) is not None}
    if args.drift:
        updates["drifts"] = [parse_drift(d) for d in args.drift]
    sim_config = config.simulator.model_validate({**config.simulator.model_dump(), **updates})
    if args.out:
        sink = JsonlSink(args.out)
    else:
        bootstrap = args.bootstrap_servers or config.kafka.bootstrap_servers
        topic = args.topic or config.kafka.topic
        create_topics(bootstrap, [topic], config.kafka.partitions, client_overrides=config.kafka.client_overrides)
        sink = KafkaSink(bootstrap, topic, config.kafka.client_overrides, mark_end=args.end_of_input)
    truth_file = open(args.truth, "wb") if args.truth else None
    try:
        stats = run_simulation(sim_config, sink, stop=stop_event_on_signals(),
                               truth_sink=(lambda t: truth_file.write(orjson.dumps(t) + b"\n")) if truth_file else None)
    finally:
        if truth_file:
            truth_file.close()
    summary = stats.summary()
    if args.json:
        print_json(summary)
    else:
        print(" ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
    return 0
