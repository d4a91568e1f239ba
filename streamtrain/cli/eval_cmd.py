"""`streamtrain eval CHECKPOINT|VERSION`: leave-last-out HR@K / NDCG@K of the retrieval head."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from streamtrain.cli.common import add_config_flags, config_from_args, print_json
from streamtrain.cli.exit_codes import InputError

_VERSION = re.compile(r"^v\d{6}$")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval", help="retrieval metrics (leave-last-out HR@K, NDCG@K) of a checkpoint or a published version",
        description="Holds out each user's last click from the user histories of a checkpoint (the joiner's "
                    "rings), computes the retrieval head's user vector from the events before that exposure, "
                    "searches every item of the item table with FAISS (exact inner product) and reports HR@K and "
                    "NDCG@K, beside a popularity ranking. A published version (vNNNNNN) is evaluated with its own "
                    "weights and the histories of the checkpoint it names.")
    add_config_flags(parser)
    parser.add_argument("target", help="a checkpoint name (ckpt-...) or directory, or a published version (vNNNNNN)")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 50, 200], help="cut-offs (default 10 50 200)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.set_defaults(func=_eval)


def _eval(args: argparse.Namespace) -> int:
    import torch

    from checkpoints import CheckpointStore
    from checkpoints.reader import load_dir
    from streamtrain.embedding.delta import read_parquet
    from streamtrain.retrieval.evaluate import evaluate
    from streamtrain.runtime.publisher import Publisher
    from streamtrain.runtime.releases import DENSE_FILE, table_file
    from streamtrain.trainer import build_trainer

    config = config_from_args(args)
    trainer = build_trainer(config, torch.device("cpu"))
    store = CheckpointStore(config.checkpoints.root, readonly=True)
    if _VERSION.match(args.target):
        version = Publisher(config.published_root).version(args.target)
        if version is None:
            raise InputError(f"no published version {args.target} under {config.published_root}")
        source = version.manifest.get("checkpoint")
        if not source:
            raise InputError(f"{args.target} names no checkpoint: its user histories are unknown")
        from safetensors.torch import load_file

        trainer.load_published(load_file(str(version.path / DENSE_FILE)),
                               {n: read_parquet(version.path / table_file(n)) for n in trainer.tables})
        pipeline = store.load(source, components=["pipeline"]).components["pipeline"]
        what: dict[str, Any] = {"version": args.target, "checkpoint": source}
    else:
        path = Path(args.target)
        ckpt = load_dir(path, ["trainer", "pipeline"]) if (path / "MANIFEST.json").is_file() else \
            store.load(args.target, components=["trainer", "pipeline"])
        trainer.load_state_dict(ckpt.components["trainer"], model_only=True)
        pipeline = ckpt.components["pipeline"]
        what = {"checkpoint": ckpt.name}
    result = {**what, **evaluate(trainer, pipeline["joiner"]["history"], config.joiner.gap_bucket_edges_ms, args.k)}
    if args.json:
        print_json(result)
    else:
        print(f"{result['users']:,} users with a held-out click, {result['items']:,} items", file=sys.stderr)
        for name in ("model", "popularity"):
            if name in result:
                print(f"  {name:<10} " + "  ".join(f"{k} {v:.4f}" for k, v in result[name].items()), file=sys.stderr)
    return 0
