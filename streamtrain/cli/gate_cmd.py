"""`streamtrain gate status|freeze|unfreeze`: talk to a running daemon's control endpoint."""

from __future__ import annotations

import argparse
import urllib.error
import urllib.request
from pathlib import Path

import orjson

from streamtrain.cli.common import add_config_flags, config_from_args, print_json
from streamtrain.config import StreamtrainConfig
from streamtrain.services import ServiceError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("gate", help="inspect or change the publication gate of a running daemon",
                            description="Reads GET /status; freeze/unfreeze POST to the control endpoint with the "
                                        "bearer token (default: <run_dir>/control.token written by the daemon).")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in (("status", "print the daemon's status (gate, monitors, offsets, lag, checkpoint, version)"),
                       ("freeze", "freeze publication (sticky until a manual unfreeze)"),
                       ("unfreeze", "lift a manual freeze")):
        p = verbs.add_parser(verb, help=text)
        add_config_flags(p)
        p.add_argument("--url", help="control endpoint (default: the one the daemon wrote to <run_dir>/endpoints.json, "
                                     "else http://control.host:control.port)")
        p.add_argument("--token-file", type=Path, help="bearer token file (default: <run_dir>/control.token)")
        if verb != "status":
            p.add_argument("--reason", default=f"manual {verb} from CLI", help="recorded with the transition")
        p.set_defaults(func=_gate)


def control_url(config: StreamtrainConfig) -> str:
    """Where the daemon of this config listens: what it wrote at start (its port may have
    been picked then), else the configured address."""
    try:
        written = orjson.loads(config.endpoints_path.read_bytes()).get("control")
    except (OSError, orjson.JSONDecodeError):
        written = None
    return written or f"http://{config.control.host}:{config.control.port}"


def _gate(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    url = (args.url or control_url(config)).rstrip("/")
    if args.verb == "status":
        request = urllib.request.Request(url + "/status")
    else:
        token_file = args.token_file or config.run_dir / "control.token"
        try:
            token = config.control.token or token_file.read_text().strip()
        except OSError as exc:
            raise ServiceError(f"cannot read the control token from {token_file}: {exc.strerror}; pass --token-file") from None
        request = urllib.request.Request(url + "/" + args.verb, method="POST", data=orjson.dumps({"reason": args.reason}),
                                         headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            print_json(orjson.loads(resp.read()))
    except urllib.error.HTTPError as err:
        raise ServiceError(f"{url}: HTTP {err.code}: {err.read().decode(errors='replace')}") from None
    except urllib.error.URLError as err:
        raise ServiceError(f"cannot reach the daemon's control endpoint at {url}: {err.reason}") from None
    return 0
