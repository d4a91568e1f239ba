"""Ablations of the model, each switch off in turn, over seeds, on the same rows as MF and the oracle.

    python -m bench.ablations [--quick] [--seeds 0 1 2] [--exposures N] [--variants NAME ...]
                              [--out DIR] [--jobs N]

Every variant is one ``python -m bench.quality --offline`` run over the seeds (the same
Trainer, the same consumer pipeline, the same exposure rows of the demo world, no Kafka:
see ``bench/quality.py``) with the ``--set`` overrides of :data:`VARIANTS`:

* ``full`` -- the defaults; its run also trains the mean-pooled-history model, the HSTU ablation;
* ``random_negatives`` -- no rank-package negatives: InfoNCE sees random + in-batch negatives only;
* ``no_time`` -- hour, weekday, gap bucket, history ages and event times read as constants;
* ``no_ctr_priors`` -- the user/item CTR-prior features read as constants (issue #14);
* ``hashed_1024`` -- fixed hashed embeddings: every table a fixed set of 1,024 rows indexed by
  splitmix64(id) mod 1024, colliding ids sharing a row, every row trained from its first
  sight (no admission threshold) and never evicted;
* ``dynamic_admit_all`` -- dynamic tables admitting every id at first sight, never evicting:
  ``hashed_1024`` without the collisions, so the two effects can be told apart.

Each variant's bench.quality JSON goes to ``--out`` (``<variant>.json``, with its log and
learning-curve PNG); a variant whose JSON is there for the same seeds, exposures and
overrides is not run again, so an interrupted grid resumes. Figures per variant: mean and
sample standard deviation over seeds of the last-20 % CTR and CTCVR AUC, beside MF (best
learning rate of its grid) and the oracle on the same rows, the paired difference from
``full`` (same seed, same rows), and retrieval HR@50 / NDCG@50.

Hot/cold splits from local vs global popularity (issue #14): the rank package marks each
history event hot when its item's popularity is above the ``popularity.hot_quantile``
quantile. One joiner that reads every partition (``kafka.mode=assign``, the default) counts
every event: its local counts *are* the global ones. A scale-out rank reading a share of
the partitions (``kafka.only_partitions``) counts only that share. For 1, 2, 4 and 8 ranks
(events split by the keyed partitioner), :func:`popularity_splits` replays the stream in
event time through :class:`consumers.popularity.InProcessPopularity`, refreshed at every
``joiner.stats_refresh_ms`` boundary as the joiner does, once over all events (global)
and once per rank over its share (local), and reports how often an event's hot flag and
how far its item CTR prior differ.

``--quick``: seed 0 of 20k exposures (figures indicative only).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import announce_quick, machine_info, parser, print_result, rounded
from bench.demo_setup import read_demo_config
from bench.quality import stream_config
from consumers.popularity import InProcessPopularity
from consumers.schema import Action, hash_id
from streamtrain.simulator import EventStream

_TABLES = ("item", "user", "sparse")
HASH_BUCKETS = 1024  # about the demo world's 1,000 items: ~59 % of them share a row with another
_EVERY_ROW = [f"embeddings.{t}.{k}" for t in _TABLES for k in ("admission.min_count=1", "eviction.policy=none")]
VARIANTS: dict[str, list[str]] = {
    "full": [],
    "random_negatives": ["model.retrieval.rank_package_negatives=false"],
    "no_time": ["model.time_features=false"],
    "no_ctr_priors": ["model.ctr_prior_features=false"],
    f"hashed_{HASH_BUCKETS}": [f"embeddings.{t}.hash_buckets={HASH_BUCKETS}" for t in _TABLES] + _EVERY_ROW,
    "dynamic_admit_all": _EVERY_ROW,  # the hashed variant without its collisions: what admission alone does
}
RANKS = (1, 2, 4, 8)
QUICK_EXPOSURES, FULL_EXPOSURES = 20_000, 100_000
_ACTIONS = {"exposure": Action.EXPOSURE, "click": Action.CLICK, "convert": Action.CONVERT}


# ---------------------------------------------------------------------------- the grid
def quality_command(name: str, seeds: Sequence[int], exposures: int, out: Path) -> list[str]:
    """The bench.quality command line of one variant (only ``full`` also trains meanpool)."""
    cmd = [sys.executable, "-m", "bench.quality", "--offline", "--exposures", str(exposures),
           "--seeds", *map(str, seeds), "--plot", str(out / f"{name}.png")]
    cmd += [] if name == "full" else ["--no-meanpool"]
    return cmd + [arg for override in VARIANTS[name] for arg in ("--set", override)]


def run_variant(name: str, seeds: Sequence[int], exposures: int, out: Path) -> dict[str, Any]:
    """The variant's bench.quality result, from ``out`` when it was already run alike."""
    saved = out / f"{name}.json"
    if saved.exists():
        result = json.loads(saved.read_text())
        if (result["exposures"], sorted(result["seeds"]), sorted(result["overrides"])) == \
                (exposures, sorted(map(str, seeds)), sorted(VARIANTS[name])):  # distinct keys: order is moot
            print(f"{name}: reusing {saved}", flush=True)
            return result
    log = out / f"{name}.log"
    print(f"{name}: running, log in {log}", flush=True)
    with log.open("w") as sink:
        subprocess.run(quality_command(name, seeds, exposures, out), stdout=sink, stderr=subprocess.STDOUT, check=True)
    last = log.read_text().strip().splitlines()[-1]
    saved.write_text(last + "\n")
    return json.loads(last)


def per_seed(result: dict[str, Any], task: str, scorer: str) -> np.ndarray:
    return np.array([seed[task]["last_20pct"][scorer] for _, seed in sorted(result["seeds"].items())])


def spread(values: np.ndarray) -> dict[str, float | None]:
    """Mean and sample standard deviation (None for one seed)."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": rounded(float(np.mean(values)), 4), "std": rounded(std, 4)}


def retrieval(result: dict[str, Any], metric: str) -> np.ndarray:
    return np.array([seed["retrieval"]["model"][metric] for _, seed in sorted(result["seeds"].items())])


def rows_of(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One table row per variant (plus ``meanpool`` from ``full``'s run)."""
    table: dict[str, dict[str, Any]] = {}
    full = results.get("full")
    for name, result in results.items():
        row: dict[str, Any] = {}
        for task in ("ctr", "ctcvr"):
            model = per_seed(result, task, "model")
            row[task] = {k: spread(per_seed(result, task, k)) for k in ("mf", "oracle")} | {"model": spread(model)}
            if full is not None and name != "full":
                row[task]["delta_vs_full"] = spread(model - per_seed(full, task, "model"))
        row["retrieval"] = {m: spread(retrieval(result, m)) for m in ("hr@50", "ndcg@50")}
        table[name] = row
        if name == "full" and "meanpool" in result["seeds"][next(iter(result["seeds"]))]["ctr"]["last_20pct"]:
            table["meanpool"] = {task: {"model": spread(per_seed(result, task, "meanpool")),
                                        "mf": row[task]["mf"], "oracle": row[task]["oracle"],
                                        "delta_vs_full": spread(per_seed(result, task, "meanpool") - per_seed(result, task, "model"))}
                                 for task in ("ctr", "ctcvr")}
    return table


def print_table(table: dict[str, dict[str, Any]]) -> None:
    def fmt(s: dict[str, float | None]) -> str:
        return f"{s['mean']:.4f}" + ("" if s["std"] is None else f" ± {s['std']:.4f}")

    for name, row in table.items():
        delta = row["ctr"].get("delta_vs_full")
        print(f"{name:>18}: CTR {fmt(row['ctr']['model'])} (Δ {fmt(delta) if delta else '-'}) mf {fmt(row['ctr']['mf'])} "
              f"oracle {fmt(row['ctr']['oracle'])} | CTCVR {fmt(row['ctcvr']['model'])} mf {fmt(row['ctcvr']['mf'])} "
              f"oracle {fmt(row['ctcvr']['oracle'])}" + (f" | hr@50 {fmt(row['retrieval']['hr@50'])}" if "retrieval" in row else ""),
              flush=True)


# ---------------------------------------------------------------------------- local vs global popularity
def stream_events(exposures: int, seed: int) -> tuple[dict[str, np.ndarray], Any]:
    """The seeded demo-world stream's valid events in event-time order (ties in arrival
    order), as arrays, with the config it came from."""
    config = stream_config(read_demo_config(), exposures, seed, [])
    cols: dict[str, list[int]] = {"ts": [], "user": [], "item": [], "action": [], "crc": []}
    for event in EventStream(config.simulator):
        if not event.valid:
            continue
        body = json.loads(event.value)
        for name, value in (("ts", body["ts"]), ("user", hash_id(body["user_id"])), ("item", hash_id(body["item_id"])),
                            ("action", _ACTIONS[body["type"]]), ("crc", zlib.crc32(event.key))):
            cols[name].append(value)
    arrays = {k: np.array(v, np.int64) for k, v in cols.items()}
    order = np.argsort(arrays["ts"], kind="stable")
    return {k: v[order] for k, v in arrays.items()}, config


def popularity_views(events: dict[str, np.ndarray], share: np.ndarray, config: Any) -> tuple[np.ndarray, np.ndarray]:
    """Hot flag and item CTR prior of every event from the counts of the events in ``share``
    (bool per event) -- refreshed at each ``stats_refresh_ms`` boundary of event time, as the
    joiner refreshes its popularity source -- for the events of ``share``."""
    source = InProcessPopularity(config.popularity)
    hot = np.zeros(len(share), bool)
    prior = np.zeros(len(share))
    mine = np.flatnonzero(share)
    bucket = events["ts"][mine] // config.joiner.stats_refresh_ms
    for part in np.split(mine, np.flatnonzero(np.diff(bucket)) + 1):  # one refresh interval each
        hot[part] = source.item_popularity(events["item"][part]) > source.hot_threshold()
        prior[part] = source.ctr_priors(events["user"][part], events["item"][part])[1]
        source.observe(events["user"][part], events["item"][part], events["action"][part], events["ts"][part])
        source.refresh()
    return hot, prior


def popularity_splits(exposures: int, seed: int) -> dict[str, Any]:
    """Hot/cold disagreement and item-prior distance, local (per rank) vs global counts."""
    events, config = stream_events(exposures, seed)
    everyone = np.ones(len(events["ts"]), bool)
    global_hot, global_prior = popularity_views(events, everyone, config)
    out: dict[str, Any] = {"events": len(everyone), "hot_share_global": rounded(float(global_hot.mean()), 4)}
    for ranks in RANKS:
        local_hot = np.zeros_like(global_hot)
        local_prior = np.zeros_like(global_prior)
        for rank in range(ranks):
            share = events["crc"] % ranks == rank
            hot, prior = popularity_views(events, share, config)
            local_hot[share], local_prior[share] = hot[share], prior[share]
        out[f"ranks_{ranks}"] = {"hot_flag_differs": rounded(float((local_hot != global_hot).mean()), 4),
                                 "hot_share_local": rounded(float(local_hot.mean()), 4),
                                 "item_prior_mean_abs_diff": rounded(float(np.abs(local_prior - global_prior).mean()), 5)}
    return out


def main(argv: Sequence[str] | None = None) -> None:
    cli = parser(__doc__, f"seed 0 of {QUICK_EXPOSURES:,} exposures instead of seeds 0-2 of {FULL_EXPOSURES:,}")
    cli.add_argument("--seeds", type=int, nargs="+", help="simulator seeds (default: 0 1 2, or 0 with --quick)")
    cli.add_argument("--exposures", type=int, help=f"exposures per seed (default {FULL_EXPOSURES:,})")
    cli.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    cli.add_argument("--out", type=Path, default=Path("runs/ablations"), help="per-variant JSON, logs, PNGs")
    cli.add_argument("--jobs", type=int, default=1, help="variants run at once (each is one process)")
    args = cli.parse_args(argv)
    seeds = tuple(args.seeds or ((0,) if args.quick else (0, 1, 2)))
    exposures = args.exposures or (QUICK_EXPOSURES if args.quick else FULL_EXPOSURES)
    if args.quick:
        announce_quick({"exposures": exposures, "seeds": seeds})
    args.out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        futures = {name: pool.submit(run_variant, name, seeds, exposures, args.out) for name in args.variants}
        splits = popularity_splits(exposures, seeds[0])
        results = {name: future.result() for name, future in futures.items()}
    table = rows_of(results)
    print_table(table)
    for ranks in RANKS:
        s = splits[f"ranks_{ranks}"]
        print(f"popularity, {ranks} rank(s): hot flag differs from global on {s['hot_flag_differs']:.2%} of events, "
              f"item CTR prior |local - global| {s['item_prior_mean_abs_diff']:.5f}", flush=True)
    print_result({"benchmark": "ablations", "quick": args.quick, "exposures": exposures, "seeds": list(seeds),
                  "variants": {name: VARIANTS[name] for name in args.variants}, "table": table,
                  "popularity_splits": splits, "machine": machine_info(with_torch=True)})


if __name__ == "__main__":
    main()
