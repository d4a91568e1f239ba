"""`streamtrain checkpoints list|inspect|verify|rollback ROOT`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from checkpoints import cli_support
from streamtrain.cli.common import print_json


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("checkpoints", help="list, inspect, verify or roll back checkpoints",
                            description="Work on a checkpoint root (checkpoints.root, e.g. runs/default/checkpoints). "
                                        "Read-only except rollback, which points LATEST at an older intact checkpoint "
                                        "and moves newer ones to rolled-back/.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    specs = {
        "list": ("every checkpoint, oldest first (quick size check; --full hashes)", False),
        "inspect": ("one checkpoint's manifest, components and files (default: LATEST)", False),
        "verify": ("full sha256 check of one checkpoint, or of all plus what a restart would load; exit 1 if damaged", False),
        "rollback": ("point LATEST at NAME (must be intact)", True),
    }
    for verb, (text, needs_name) in specs.items():
        p = verbs.add_parser(verb, help=text)
        p.add_argument("root", type=Path, help="checkpoint root directory")
        p.add_argument("name", nargs=None if needs_name else "?", help="checkpoint name, e.g. ckpt-000000001200")
        if verb == "list":
            p.add_argument("--full", action="store_true", help="verify sha256 of every file")
        p.add_argument("--json", action="store_true", help="print as one JSON object")
        p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.verb == "list":
        doc: dict[str, Any] = cli_support.list_checkpoints(args.root, full=args.full)
    elif args.verb == "inspect":
        doc = cli_support.inspect_checkpoint(args.root, args.name)
    elif args.verb == "verify":
        doc = cli_support.verify_checkpoints(args.root, args.name)
    else:
        doc = cli_support.rollback_checkpoint(args.root, args.name)
    if args.json:
        print_json(doc)
    else:
        print(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None), end="")
    return 0 if doc.get("ok", True) else 1
