"""`streamtrain broker` and `streamtrain redis`: run an embedded service in the foreground."""

from __future__ import annotations

import argparse
import sys

from streamtrain.cli.common import print_json, stop_event_on_signals
from streamtrain.services import EmbeddedBroker, EmbeddedRedis


def register(sub: argparse._SubParsersAction) -> None:
    broker = sub.add_parser("broker", help="run the embedded Kafka-compatible broker (Tansu) until Ctrl-C",
                            description="Run the embedded, memory-only Kafka-compatible broker on loopback. "
                                        "Data is lost when it stops.")
    broker.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    broker.add_argument("--topics", nargs="*", default=["events", "events.dlq"], help="topics to create")
    broker.add_argument("--partitions", type=int, default=4)
    broker.add_argument("--json", action="store_true", help="print the address as JSON")
    broker.set_defaults(func=_broker)
    redis = sub.add_parser("redis", help="run an embedded Redis (no persistence) until Ctrl-C",
                           description="Run redis-server on loopback with persistence off.")
    redis.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    redis.add_argument("--json", action="store_true", help="print the URL as JSON")
    redis.set_defaults(func=_redis)


def _broker(args: argparse.Namespace) -> int:
    stop = stop_event_on_signals()
    with EmbeddedBroker(port=args.port) as broker:
        if args.topics:
            broker.create_topics(args.topics, partitions=args.partitions)
        _announce(args.json, {"bootstrap_servers": broker.bootstrap_servers, "pid": broker.pid, "log": str(broker.log_path)},
                  f"broker at {broker.bootstrap_servers} (log {broker.log_path}); Ctrl-C to stop")
        stop.wait()
    return 0


def _redis(args: argparse.Namespace) -> int:
    stop = stop_event_on_signals()
    with EmbeddedRedis(port=args.port) as redis:
        _announce(args.json, {"url": redis.url, "pid": redis.pid}, f"redis at {redis.url}; Ctrl-C to stop")
        stop.wait()
    return 0


def _announce(as_json: bool, doc: dict, text: str) -> None:
    if as_json:
        print_json(doc)
    else:
        print(text, file=sys.stderr, flush=True)
