"""Chaos at scale: the real daemon, SIGKILLed again and again at seeded random moments, must
end in the state of an uninterrupted run -- without and with the Redis cold tier.

    python -m bench.chaos [--quick] [--seed S] [--kills N] [--keep DIR] [--set SECTION.FIELD=VALUE ...]

Everything is real and local. The benchmark starts an embedded broker (Tansu, in memory) and
an embedded Redis, produces one seeded log of the demo world, and runs the CLI as an operator
would (``python -m streamtrain run --config FILE``, JSON logs at INFO) with the demo's
configuration (``configs/demo.yaml``: joiner ``emit_then_correct``, releases, monitors), a
checkpoint every 8 batches (4 with ``--quick``) and every checkpoint kept (the ledger chain
must reach back to the first). The log ends with end-of-input markers, so every run trains
it to its last sample and exits by itself: the final checkpoints are comparable in
everything, Kafka positions and joiner state included (where a run stopped mid-log would
depend on how fetches landed, which differs between any two runs). For each configuration:

1. **reference** -- one uninterrupted run to the end of the log;
2. **chaos** -- the same command on a fresh run dir, SIGKILLed (``bench.kills``) at moments
   drawn from ``--seed``: while a checkpoint is being written (a ``.tmp-ckpt-*`` directory
   of this process exists; the kill counts as during the write only if that directory is
   still there after the process died, i.e. it never got renamed into place), during
   start-up (before the process's first checkpoint: at a random moment after spawn, or
   after its restore ended -- the ``resumed from`` log line) or between checkpoints (a
   random fraction of a checkpoint interval after one of its commits). What the schedule
   aimed at and where each kill landed are both reported. After each kill the daemon is
   started again, until a start runs to the end of the log;
3. **judge** -- the chaos run's final checkpoint against the reference's over all state
   (``checkpoints.state_differences``, but ``streamtrain.runtime.exactness.NOT_REPLAYED``),
   the manifest's offsets and watermark, and the ledger chain: every trained row exactly
   once, i.e. the chain's sample ids equal the reference's as a multiset (with
   ``emit_then_correct`` a correction row carries its exposure's sample id, so an id may
   legitimately appear more than once), as many as the reference trained, no link lost. A divergence also names
   the first checkpoint on the chaos run's chain whose trained state (trainer, monitors,
   releases) differs from the reference's checkpoint of the same step.

Configurations: ``no_redis`` (the demo's tables, which never evict at this size) and
``redis_cold_tier`` (``redis.url`` set; item and user tables capped well below the world's
ids with LRU eviction, room eviction and a periodic pass, so rows spill to Redis and come
back). A cold-tier run whose final counters show no spills or no cold hits proved nothing
about the cold tier and fails like a divergence. Restart times: spawn -> ``resumed from``
and spawn -> the process's first committed checkpoint (``LATEST`` moved), per restart.

``--quick``: a shorter log and 5 kills per configuration (a few minutes here). The last line
printed is one JSON object; the exit status is 1 when a configuration diverged or its cold
tier was not exercised.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from bench.common import announce_quick, machine_info, parser, print_result, rounded
from bench.demo_setup import DemoSetup, broker_state, produce_log
from bench.kills import BETWEEN, STARTUP, WRITE, KillPlan, Life, Pace, kill_schedule, supervise
from bench.restart import cli_command, read_latest
from checkpoints import CheckpointStore, ledger_chain, state_differences
from streamtrain.runtime.exactness import NOT_REPLAYED
from streamtrain.services import EmbeddedBroker, EmbeddedRedis

# Never by wall time; all kept: the ledger chain is followed back to the first.
CHECKPOINTS = {"every_seconds": None, "keep_last": 100_000}
# Tables far smaller than the demo world (500 users, 1,000 items): LRU room eviction on every
# admission into a full table and a periodic pass every 8 steps (its spills are versioned
# step + 1), so rows spill to Redis and are read back when their ids return.
COLD_TIER_TABLES = {name: {"initial_rows": rows, "max_rows": rows, "eviction": {"policy": "lru", "every_n_steps": 8}}
                    for name, rows in (("item", 384), ("user", 128))}
CONFIGURATIONS = ("no_redis", "redis_cold_tier")
COUNTERS = ("spills", "cold_hits", "cold_misses", "evictions", "admissions", "rejections")
# At two checkpoints of the same step, how far the consumer had read depends on how fetches
# landed, so first_divergence compares these only where both hold the same Kafka positions.
# The final checkpoints are compared in everything: both runs have read the whole log.
CONSUMED = {"pipeline": "joiner state of what was consumed, which depends on poll timing",
            "buffer": "samples emitted but not yet trained, likewise"}


@dataclass(frozen=True)
class Sizes:
    exposures: int  # in the pre-produced log, which ends with end-of-input markers
    kills: int  # SIGKILLs per configuration
    checkpoint_every: int = 1024  # samples (4 batches of 256); a demo checkpoint is ~24 MB on disk


QUICK = Sizes(exposures=15_000, kills=5)
FULL = Sizes(exposures=70_000, kills=20, checkpoint_every=2048)  # ~35 checkpoints of each of 4 runs: ~3.5 GB


# ---------------------------------------------------------------------------- the log
@dataclass(frozen=True)
class World:
    """What every run shares: the demo config layers, the services and the log."""

    demo: DemoSetup
    topic: str
    messages: int  # events in the log
    services: Mapping[str, int | None]  # name -> pid of the broker and Redis, watched while daemons run
    checkpoint_every: int  # samples between checkpoints


def prepare_world(demo: DemoSetup, work: Path, sizes: Sizes, services: Mapping[str, int | None]) -> World:
    """Produce a seeded log of ``sizes.exposures``, ended by end-of-input markers, on a new topic."""
    topic = f"chaos-{time.time_ns()}"
    config = demo.config(work / "log", topic)
    messages = int(produce_log(config, sizes.exposures, mark_end=True)["events"])
    return World(demo, topic, messages, services, sizes.checkpoint_every)


# ---------------------------------------------------------------------------- the judge
def final_checkpoint(root: Path) -> Any:
    with CheckpointStore(root, readonly=True) as store:
        return store.load()


def ledger_problems(root: Path, samples: int, expected: np.ndarray | None = None) -> list[str]:
    """What is wrong with a run's ledger chain: no link lost, ``samples`` rows, and when
    ``expected`` (the reference's ids) is given, each of its rows exactly once."""
    chain = ledger_chain(root)
    ids = chain.sample_ids()
    problems = [] if chain.truncated_at is None else [f"ledger: chain cut at {chain.truncated_at}"]
    if len(ids) != samples:
        problems.append(f"ledger: {len(ids)} sample ids for {samples} samples trained")
    if expected is not None:
        got, want = Counter(ids.tolist()), Counter(expected.tolist())
        for what, extra in (("trained more often than in the reference", got - want), ("lost", want - got)):
            if extra:
                problems.append(f"ledger: {sum(extra.values())} rows {what} ({len(extra)} sample ids)")
    return problems


def differences(reference: Path, chaos: Path, samples: int) -> list[str]:
    """Everything in which the chaos run's final checkpoint differs from the reference's."""
    ref, got = final_checkpoint(reference), final_checkpoint(chaos)
    found = state_differences(ref.components, got.components, NOT_REPLAYED)
    for what in ("offsets", "watermark"):
        if getattr(ref, what) != getattr(got, what):
            found.append(f"manifest.{what}: {getattr(ref, what)!r:.120} vs {getattr(got, what)!r:.120}")
    found += [f"reference {p}" for p in ledger_problems(reference, samples)]
    return found + ledger_problems(chaos, samples, ledger_chain(reference).sample_ids())


def first_divergence(reference: Path, chaos: Path) -> dict[str, Any] | None:
    """The oldest checkpoint on the chaos run's chain that differs from the reference's
    checkpoint of the same step (consumer side only where both had read as far), with its
    differences; None when every shared step agrees."""
    with CheckpointStore(reference, readonly=True) as ref_store, CheckpointStore(chaos, readonly=True) as got_store:
        compared = 0
        for link in ledger_chain(chaos).links:
            if not (reference / link.name).is_dir():
                continue
            ref, got = ref_store.load(link.name), got_store.load(link.name)
            exclude = NOT_REPLAYED if ref.offsets == got.offsets else {**NOT_REPLAYED, **CONSUMED}
            if found := state_differences(ref.components, got.components, exclude):
                return {"checkpoint": link.name, "step": link.step, "same_before": compared, "differences": found[:20]}
            compared += 1
    return None


def table_counters(state: Any) -> dict[str, dict[str, int]]:
    """The embedding tables' counters (spills, cold hits, ...) in a loaded checkpoint."""
    tables = state.components["trainer"]["tables"]
    return {name: {c: int(t[f"counters.{c}"]) for c in COUNTERS} for name, t in sorted(tables.items())}


# ---------------------------------------------------------------------------- one configuration
def config_file(world: World, run_dir: Path, redis: dict[str, str] | None) -> Path:
    """The effective config of one run, every key explicit, written beside its run dir."""
    group = f"{world.topic}-{run_dir.parent.name}-{run_dir.name}"  # lag tools only; one per run keeps them apart
    layers: dict[str, Any] = {"checkpoints": {**CHECKPOINTS, "every_samples": world.checkpoint_every},
                              "kafka": {"group_id": group}}
    if redis is not None:
        layers |= {"redis": redis, "embeddings": COLD_TIER_TABLES}
    cfg = world.demo.config(run_dir, world.topic, **layers)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def run_configuration(world: World, work: Path, plans: list[KillPlan], redis_url: str | None) -> dict[str, Any]:
    """Reference, chaos run (``plans``, then a run to the end) and judgement for one
    configuration, in ``work`` (its name names the configuration)."""
    name = work.name
    (work / "logs").mkdir(parents=True)
    roots: dict[str, Path] = {}
    commands: dict[str, list[str]] = {}
    for role in ("reference", "chaos"):
        redis = None if redis_url is None else {"url": redis_url, "key_prefix": f"{world.topic}:{name}:{role}:"}
        roots[role] = work / role / "checkpoints"
        config = config_file(world, work / role, redis)
        commands[role] = cli_command(config)  # no stop point: the log's end-of-input markers end the run

    started = time.monotonic()
    reference = supervise(commands["reference"], work / "logs" / "reference.log", roots["reference"], world.services)
    reference_s = time.monotonic() - started
    samples = int(final_checkpoint(roots["reference"]).components["trainer"]["samples"])
    commits = reference.commits_s
    pace = Pace(startup_s=commits[0], interval_s=float(np.median(np.diff(commits))) if len(commits) > 1 else 1.0)
    print(f"[{name}] reference: {samples:,} samples, {len(commits)} checkpoints in {reference_s:.1f} s "
          f"(first after {pace.startup_s:.2f} s, then every {pace.interval_s:.2f} s)", flush=True)

    lives: list[Life] = []
    started = time.monotonic()
    for i, plan in enumerate([*plans, None]):
        life = supervise(commands["chaos"], work / "logs" / f"chaos-{i:02d}.log", roots["chaos"], world.services,
                         plan, pace)
        lives.append(life)
        aim = "run to the end" if plan is None else plan.aim + (" (after restore)" if plan.after_restore and
                                                                plan.aim == STARTUP else "")
        print(f"[{name}] start {i:2d}: aim {aim:<32} -> {life.landed or f'exited {life.exit_code}'}"
              f"{f' after {life.killed_after_s:.2f} s' if life.killed_after_s else ''}; {len(life.commits_s)} "
              f"checkpoint(s); LATEST {read_latest(roots['chaos'])}", flush=True)
        if life.landed is None:
            break
    chaos_s = time.monotonic() - started

    found = differences(roots["reference"], roots["chaos"], samples)
    final, ref_final = final_checkpoint(roots["chaos"]), final_checkpoint(roots["reference"])
    cold = {t: c for t, c in table_counters(final).items() if redis_url is not None and t in COLD_TIER_TABLES}
    landed = [life.landed for life in lives if life.landed]
    restarts = lives[1:]  # every start after a kill
    return {
        "identical": not found, "differences": found,
        "first_divergence": first_divergence(roots["reference"], roots["chaos"]) if found else None,
        "samples": int(final.components["trainer"]["samples"]), "kills": len(landed), "kills_planned": len(plans),
        "kills_during_write": landed.count(WRITE), "kills_during_startup": landed.count(STARTUP),
        "kills_between_checkpoints": landed.count(BETWEEN),
        "startup_kills_after_resumed": sum(1 for life in lives if life.landed == STARTUP and life.resumed_s is not None
                                           and life.resumed_s < (life.killed_after_s or 0)),
        "aims": [plan.aim for plan in plans],
        "restart_to_resumed_s": [rounded(life.resumed_s) for life in restarts],
        "restart_to_checkpoint_s": [rounded(life.first_checkpoint_s) for life in restarts],
        "checkpoints": len(ledger_chain(roots["chaos"]).links), "reference_checkpoints": len(commits),
        "read_whole_log": final.offsets == ref_final.offsets and final.components["pipeline"]["ended"] != [],
        "reference_s": round(reference_s, 1), "chaos_s": round(chaos_s, 1),
        "cold_tier": cold or None,
        "cold_tier_exercised": redis_url is None or all(c["spills"] > 0 and c["cold_hits"] > 0 for c in cold.values()),
        "reference_cold_tier": {t: c for t, c in table_counters(ref_final).items() if t in cold} or None,
        "lives": [life.row() for life in lives],
    }


# ---------------------------------------------------------------------------- report
def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _spread(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{statistics.median(known):.2f} ({max(known):.2f})" if known else "-"


def report(runs: dict[str, dict[str, Any]]) -> None:
    line = "-" * 100
    print(line)
    print(f"{'configuration':<17}{'kills':>6}{'write':>7}{'start-up':>9}{'between':>8}{'spawn->resumed s':>18}"
          f"{'spawn->ckpt s':>15}{'samples':>9}{'whole log':>10}  identical")
    for name, r in runs.items():
        print(f"{name:<17}{r['kills']:>6}{r['kills_during_write']:>7}{r['kills_during_startup']:>9}"
              f"{r['kills_between_checkpoints']:>8}{_spread(r['restart_to_resumed_s']):>18}"
              f"{_spread(r['restart_to_checkpoint_s']):>15}{r['samples']:>9,}"
              f"{'yes' if r['read_whole_log'] else 'NO':>10}"
              f"  {'yes' if r['identical'] else 'NO'}")
    print("  restart times: median (max) over the starts after a kill; 'whole log': both runs ended at the log's end")
    for name, r in runs.items():
        for diff in r["differences"][:20]:
            print(f"  {name} differs: {diff}")
        if (first := r["first_divergence"]) is not None:
            print(f"  {name}: first differing checkpoint on the chain {first['checkpoint']} "
                  f"({first['same_before']} earlier ones equal): {first['differences'][:5]}")
        for table, c in (r["cold_tier"] or {}).items():
            print(f"  {name} {table} table: " + ", ".join(f"{k} {v:,}" for k, v in c.items()))
        if not r["cold_tier_exercised"]:
            print(f"  {name}: NOTHING SPILLED OR CAME BACK: this run proves nothing about the cold tier")
    print(line)


def run(sizes: Sizes, seed: int, overrides: list[str], work: Path) -> dict[str, dict[str, Any]]:
    """Start the services, produce the log, run every configuration in ``work``."""
    runs: dict[str, dict[str, Any]] = {}
    with EmbeddedBroker(log_dir=work) as broker, EmbeddedRedis(log_dir=work) as redis:
        try:
            world = prepare_world(DemoSetup.load(broker, overrides), work, sizes,
                                  {"broker": broker.pid, "redis": redis.pid})
            print(f"log: {world.messages:,} events, {sizes.exposures:,} exposures on {world.topic}, ended by "
                  "end-of-input markers", flush=True)
            for name in CONFIGURATIONS:
                plans = kill_schedule(random.Random(f"{seed}:{name}"), sizes.kills)
                redis_url = redis.url if name == "redis_cold_tier" else None
                runs[name] = run_configuration(world, work / name, plans, redis_url)
        except BaseException:
            print(f"failed; {broker_state(broker)}", file=sys.stderr)
            raise
    return runs


def main() -> None:
    cli = parser(__doc__, f"{QUICK.kills} kills per configuration on a shorter log (a few minutes)")
    cli.add_argument("--seed", type=int, default=0, help="seeds the kill schedule (the log's seed is the demo's)")
    cli.add_argument("--kills", type=int, default=None,
                     help=f"SIGKILLs per configuration (default {FULL.kills}, quick {QUICK.kills})")
    cli.add_argument("--keep", type=Path, default=None, metavar="DIR",
                     help="keep run dirs, configs and logs in DIR (default: a temporary dir, removed)")
    cli.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="override a daemon config value on top of configs/demo.yaml (repeatable)")
    args = cli.parse_args()
    # SIGTERM unwinds like Ctrl-C: every daemon, the broker and Redis are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sizes = QUICK if args.quick else FULL
    if args.kills is not None:
        sizes = replace(sizes, kills=args.kills)
    if args.quick:
        announce_quick(sizes)
    work = Path(tempfile.mkdtemp(prefix="bench-chaos-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        runs = run(sizes, args.seed, args.overrides, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    report(runs)

    every = list(runs.values())
    cold = runs["redis_cold_tier"]["cold_tier"] or {}
    print_result({
        "benchmark": "chaos", "quick": args.quick, "seed": args.seed, "overrides": args.overrides,
        **{key: sum(r[key] for r in every) for key in ("kills", "kills_during_write", "kills_during_startup",
                                                       "kills_between_checkpoints")},
        "identical": all(r["identical"] for r in every),
        "differences": [f"{name}: {d}" for name, r in runs.items() for d in r["differences"]],
        "samples": sum(r["samples"] for r in every),
        "restart_to_resumed_median_s": rounded(median([v for r in every for v in r["restart_to_resumed_s"]])),
        "restart_to_checkpoint_median_s": rounded(median([v for r in every for v in r["restart_to_checkpoint_s"]])),
        "spills": sum(c["spills"] for c in cold.values()), "cold_hits": sum(c["cold_hits"] for c in cold.values()),
        "runs": runs, "sizes": asdict(sizes),
        "machine": machine_info(loadavg=[round(x, 2) for x in os.getloadavg()]),
    })
    if not all(r["identical"] and r["cold_tier_exercised"] for r in every):
        sys.exit(1)


if __name__ == "__main__":
    main()
