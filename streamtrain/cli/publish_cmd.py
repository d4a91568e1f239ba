"""`streamtrain publish list|rollback`: manage published model versions (files, and Redis for serving)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from streamtrain.cli.common import add_config_flags, config_from_args, print_json
from streamtrain.config import StreamtrainConfig
from streamtrain.runtime.publisher import Publisher, PublishError, verify_version

if TYPE_CHECKING:
    from streamtrain.runtime.serving import ServingPush


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("publish", help="list published model versions or roll CURRENT back",
                            description="Published versions live in publishing.root as v<NNNNNN>/ with a CURRENT pointer. "
                                        "With redis.url set (and serving.push on), Redis serves the version CURRENT "
                                        "names: a rollback moves the Redis pointer too.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    lst = verbs.add_parser("list", help="list versions (newest last), marking CURRENT and damaged ones")
    rb = verbs.add_parser("rollback", help="point CURRENT (and Redis serving) at VERSION (verified first)")
    rb.add_argument("version", help="e.g. v000003")
    for p in (lst, rb):
        add_config_flags(p)
        p.add_argument("--root", type=Path, help="published root (default: publishing.root)")
        p.add_argument("--json", action="store_true", help="print as one JSON object")
    lst.set_defaults(func=_list)
    rb.set_defaults(func=_rollback)


def _publisher(args: argparse.Namespace, config: StreamtrainConfig) -> Publisher:
    return Publisher(args.root or config.published_root)


def _serving(config: StreamtrainConfig) -> ServingPush | None:
    """The Redis side of publishing, when configured (imports torch: only then)."""
    if not (config.redis.url and config.serving.push):
        return None
    import redis

    from streamtrain.runtime.serving import ServingPush

    client = redis.Redis.from_url(config.redis.url, socket_timeout=10.0, socket_connect_timeout=2.0)
    return ServingPush(client, config.redis.key_prefix, config.serving.keep_versions, config.serving.expire_grace_s)


def _list(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    pub = _publisher(args, config)
    current = pub.current()
    rows = [{"version": v.name, "current": current is not None and v.name == current.name,
             "created": v.manifest.get("created"), "checkpoint": v.manifest.get("checkpoint"),
             "intact": not verify_version(v)} for v in pub.versions()]
    serving = _serving(config)
    redis_side = None if serving is None else {"current": serving.pointer(), "versions": serving.versions()}
    if args.json:
        print_json({"root": str(pub.root), "versions": rows, **({} if redis_side is None else {"redis": redis_side})})
    else:
        for r in rows:
            print(f"{'*' if r['current'] else ' '} {r['version']}  checkpoint={r['checkpoint']}  "
                  f"{'ok' if r['intact'] else 'DAMAGED'}")
        if not rows:
            print(f"no versions under {pub.root}", file=sys.stderr)
        if redis_side is not None:
            print(f"redis serves {redis_side['current']} (holds {', '.join(redis_side['versions']) or 'none'})")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    publisher = _publisher(args, config)
    version = publisher.rollback(args.version)
    serving = _serving(config)
    if serving is not None and not serving.sync(publisher):
        raise PublishError(f"CURRENT -> {version.name} on disk, but the Redis pointer did not move "
                           f"({serving.counters.last_error}); the daemon retries at its next release")
    redis_side = {} if serving is None else {"redis_current": serving.pointer()}
    if args.json:
        print_json({"current": version.name, **redis_side})
    else:
        print(f"CURRENT -> {version.name}" + (f" (Redis serves {redis_side['redis_current']})" if redis_side else ""))
    return 0
