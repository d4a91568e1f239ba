"""`streamtrain publish list|rollback`: manage published model versions on disk."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamtrain.cli.common import add_config_flags, config_from_args, print_json
from streamtrain.runtime.publisher import Publisher, verify_version


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("publish", help="list published model versions or roll CURRENT back",
                            description="Published versions live in publishing.root as v<NNNNNN>/ with a CURRENT pointer.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    lst = verbs.add_parser("list", help="list versions (newest last), marking CURRENT and damaged ones")
    rb = verbs.add_parser("rollback", help="point CURRENT at VERSION (verified first)")
    rb.add_argument("version", help="e.g. v000003")
    for p in (lst, rb):
        add_config_flags(p)
        p.add_argument("--root", type=Path, help="published root (default: publishing.root)")
        p.add_argument("--json", action="store_true", help="print as one JSON object")
    lst.set_defaults(func=_list)
    rb.set_defaults(func=_rollback)


def _publisher(args: argparse.Namespace) -> Publisher:
    return Publisher(args.root or config_from_args(args).publishing.root)


def _list(args: argparse.Namespace) -> int:
    pub = _publisher(args)
    current = pub.current()
    rows = [{"version": v.name, "current": current is not None and v.name == current.name,
             "created": v.manifest.get("created"), "checkpoint": v.manifest.get("checkpoint"),
             "intact": not verify_version(v)} for v in pub.versions()]
    if args.json:
        print_json({"root": str(pub.root), "versions": rows})
    else:
        for r in rows:
            print(f"{'*' if r['current'] else ' '} {r['version']}  checkpoint={r['checkpoint']}  "
                  f"{'ok' if r['intact'] else 'DAMAGED'}")
        if not rows:
            print(f"no versions under {pub.root}", file=sys.stderr)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    version = _publisher(args).rollback(args.version)
    if args.json:
        print_json({"current": version.name})
    else:
        print(f"CURRENT -> {version.name}")
    return 0
