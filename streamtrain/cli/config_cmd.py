"""`streamtrain config show|validate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from streamtrain.cli.common import add_config_flags, config_from_args, print_json
from streamtrain.config import dump_yaml, load_config


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="show or validate configuration",
                            description="Inspect the effective configuration. Precedence: defaults < --config FILE < "
                                        "STREAMTRAIN_SECTION__FIELD env vars < --set section.field=value.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    show = verbs.add_parser("show", help="print the effective config (YAML, or --json)")
    add_config_flags(show)
    show.add_argument("--json", action="store_true", help="print as one JSON object")
    show.set_defaults(func=_show)
    validate = verbs.add_parser("validate", help="check a config file; exit 2 with one line per problem")
    validate.add_argument("file", type=Path)
    validate.set_defaults(func=_validate)


def _show(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.json:
        print_json(config.to_dict())
    else:
        print(dump_yaml(config), end="")
    return 0


def _validate(args: argparse.Namespace) -> int:
    load_config(args.file, environ={})
    print(f"{args.file}: ok")
    return 0
