"""`streamtrain replay FILE`: a real interaction log, produced as events of the contract."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from streamtrain.cli.common import add_config_flags, config_from_args, print_json, stop_event_on_signals
from streamtrain.cli.exit_codes import InputError

log = logging.getLogger("streamtrain.replay")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "replay", help="replay a timestamped interaction log (MovieLens, CSV, Parquet) as events to Kafka",
        description="Reads an interaction log, turns every row into an exposure (and a click / conversion by "
                    "rating rules), and produces the events in event-time order, keyed by user, to kafka.topic "
                    "(or to a JSON-lines file with --out). Each partition is ended with an end-of-input marker, so "
                    "`streamtrain run` trains every sample of the log and exits. Timestamps outside the decoder's "
                    "[min_ts_ms, max_ts_ms] (e.g. MovieLens' 1990s) are moved by whole weeks into them (hour of day "
                    "and weekday kept) unless --time-shift none. A row that cannot be read stops the replay with its "
                    "line number, unless --max-bad-rows allows skipping it.")
    add_config_flags(parser)
    parser.add_argument("file", type=Path, help="the log")
    parser.add_argument("--format", choices=["movielens", "csv", "parquet"], default="movielens",
                        help="movielens: 'user item rating timestamp' (tab or '::' separated, or ratings.csv with a "
                             "header); csv/parquet: columns named by --user-col etc. (default movielens)")
    parser.add_argument("--user-col", default="user", help="csv/parquet: the user id column (default user)")
    parser.add_argument("--item-col", default="item", help="csv/parquet: the item id column (default item)")
    parser.add_argument("--ts-col", default="timestamp", help="csv/parquet: the timestamp column (default timestamp)")
    parser.add_argument("--ts-unit", choices=["s", "ms"], default="s", help="csv/parquet: timestamp unit (default s)")
    parser.add_argument("--rating-col", default="rating",
                        help="csv/parquet: the rating column; '' = none (every row is a click with --click-threshold 0)")
    parser.add_argument("--delimiter", default=",", help="csv: field delimiter (default ,)")
    parser.add_argument("--click-threshold", type=float, default=4.0,
                        help="rating >= this is also a click (default 4); a negative value: no clicks")
    parser.add_argument("--convert-threshold", type=float,
                        help="a clicked row whose rating >= this also converts (default: no conversions)")
    parser.add_argument("--id-prefix", help="prefix of event and request ids (default: the file name)")
    parser.add_argument("--time-shift", choices=["auto", "none"], default="auto",
                        help="auto: move the log by whole weeks into the decoder's timestamp bounds when needed")
    parser.add_argument("--speed", type=float, default=0.0,
                        help="event seconds per wall second (0 = as fast as possible, the default)")
    parser.add_argument("--max-bad-rows", type=int, default=0, help="skip up to N unreadable rows (default 0: stop)")
    parser.add_argument("--no-end-marker", action="store_true", help="do not end the partitions with end-of-input markers")
    parser.add_argument("--bootstrap-servers", help="Kafka bootstrap (default: kafka.bootstrap_servers)")
    parser.add_argument("--topic", help="target topic (default: kafka.topic)")
    parser.add_argument("--out", type=Path, help="write JSON lines to this file instead of Kafka")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.set_defaults(func=_replay)


def _replay(args: argparse.Namespace) -> int:
    from streamtrain.replay import Columns, ReplayError, ReplayRules, build_events, read_csv, read_movielens, \
        read_parquet, replay, week_shift
    from streamtrain.services.topics import create_topics
    from streamtrain.simulator import JsonlSink, KafkaSink

    config = config_from_args(args)
    columns = Columns(user=args.user_col, item=args.item_col, ts=args.ts_col, rating=args.rating_col or None,
                      ts_unit=args.ts_unit)
    try:
        if args.format == "movielens":
            rows = read_movielens(args.file, args.max_bad_rows)
        elif args.format == "csv":
            rows = read_csv(args.file, columns, args.delimiter, args.max_bad_rows)
        else:
            rows = read_parquet(args.file, columns, args.max_bad_rows)
        if not len(rows):
            raise ReplayError(f"{args.file}: no rows to replay")
        first, last = int(rows.ts_ms.min()), int(rows.ts_ms.max())
        decoder = config.decoder
        shift = week_shift(first, last, decoder.min_ts_ms, decoder.max_ts_ms) if args.time_shift == "auto" else 0
    except (ReplayError, OSError) as exc:
        raise InputError(str(exc)) from None
    if shift == 0 and (first < decoder.min_ts_ms or last > decoder.max_ts_ms):
        log.warning("timestamps %s..%s lie outside decoder.min_ts_ms/max_ts_ms: the daemon will dead-letter them "
                    "as bad_ts unless it runs with --set decoder.min_ts_ms=%d", _day(first), _day(last), first)
    for bad in rows.bad_rows:
        log.warning("skipped %s", bad)
    rules = ReplayRules(click_threshold=None if args.click_threshold < 0 else args.click_threshold,
                        convert_threshold=args.convert_threshold, id_prefix=args.id_prefix or args.file.name,
                        time_shift_ms=shift)
    if args.out:
        sink = JsonlSink(args.out)
        where = str(args.out)
    else:
        bootstrap = args.bootstrap_servers or config.kafka.bootstrap_servers
        topic = args.topic or config.kafka.topic
        create_topics(bootstrap, [topic], config.kafka.partitions, client_overrides=config.kafka.client_overrides)
        sink = KafkaSink(bootstrap, topic, config.kafka.client_overrides, mark_end=not args.no_end_marker)
        where = f"{topic} at {bootstrap}"
    summary = replay(build_events(rows, rules), sink, speed=args.speed, stop=stop_event_on_signals())
    result = {"file": str(args.file), "rows": len(rows), "bad_rows": len(rows.bad_rows), **dataclasses.asdict(summary),
              "time_shift_days": shift // 86_400_000, "to": where,
              "end_of_input": not (args.out or args.no_end_marker or summary.stopped)}
    if args.json:
        print_json(result)
    else:
        span = f"{_day(summary.first_ts)} .. {_day(summary.last_ts)}" if summary.first_ts is not None else "-"
        print(f"replayed {result['rows']:,} rows of {args.file} to {where}: {summary.exposures:,} exposures, "
              f"{summary.clicks:,} clicks, {summary.converts:,} conversions ({span}, shifted "
              f"{result['time_shift_days']} days) in {summary.wall_s:.1f} s; {result['bad_rows']} bad rows skipped"
              + ("" if result["end_of_input"] else "; no end-of-input markers"), file=sys.stderr)
    return 1 if summary.stopped else 0


def _day(ts_ms: int | None) -> str:
    return "-" if ts_ms is None else datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")
