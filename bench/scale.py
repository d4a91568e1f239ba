"""Scale-out: samples/s with 1 and 2 workers, communication per step, step time split into compute and communication.

    python -m bench.scale [--quick] [--parts step daemon] [--set SECTION.FIELD=V ...]

The demo model and world (``configs/demo.yaml``: dim 32, history 32, batch 256), on this
machine. Two parts:

* **step** -- the training step alone, on the same global batches (the demo world's
  samples, joined once up front, no Kafka): a bare single-process ``Trainer.step`` loop
  (the baseline, 1 and 2 torch threads), and the scale-out step (``streamtrain/distributed``:
  each rank runs its half of the rows, tables sharded by key, outputs gathered, dense
  gradients all-reduced) with 1 and 2 worker processes of 1 thread each, joined over gloo
  on loopback exactly as ``streamtrain run --workers`` joins them. Per step, rank 0's wall
  time and, from its ``Comm`` counters, the bytes it sent and received and the seconds it
  spent inside collectives, per collective (waiting for the slower rank included:
  "communication" is everything that is not this rank's own computing).
* **daemon** -- end to end on a pre-produced log in the embedded broker: ``streamtrain
  run`` (the single-process daemon), ``--workers 1`` and ``--workers 2``, each to the end
  of the log; samples/s = samples / wall time of the whole command (start-up, rendezvous
  and the final checkpoint included: the workers' start costs more than one process's).

This machine has 2 cores: two workers share them with the broker and with each other,
so the 2-worker figures show the overhead of scale-out more than its gain; on one core
per worker the step part's "compute" column is what shrinks with N (docs/architecture.md,
"Scale-out", projects it). Contenders run interleaved, best of the repeats. The last line
printed is one JSON object.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from bench.common import announce_quick, interleaved, machine_info, parser, print_result, rounded
from bench.demo_setup import DemoSetup, read_demo_config
from checkpoints import CheckpointStore
from consumers.batching import SampleBuffer
from consumers.runtime import build_pipeline
from consumers.schema import SampleBatch
from consumers.testing import ListDlqSink, ListSource, partition_of
from streamtrain.config import StreamtrainConfig, build_config, flag_overrides
from streamtrain.distributed.comm import Comm
from streamtrain.distributed.group import Membership, connect, disconnect
from streamtrain.distributed.launcher import LocalRendezvous, rank_environment
from streamtrain.distributed.replicas import RowReplicas
from streamtrain.distributed.sharded_embedding import ShardedDynamicEmbedding
from streamtrain.distributed.state import pack_state, unpack_state
from streamtrain.services import EmbeddedBroker
from streamtrain.services.topics import create_topics
from streamtrain.simulator import KafkaSink, run_simulation
from streamtrain.simulator.stream import EventStream
from streamtrain.trainer import build_trainer

PARTS = ("step", "daemon")


@dataclass(frozen=True)
class Sizes:
    exposures: int  # of the demo world, joined into samples (step) or produced to the broker (daemon)
    warmup: int  # untimed steps
    steps: int  # timed steps per repeat
    repeats: int


QUICK = Sizes(exposures=6_000, warmup=2, steps=8, repeats=1)
FULL = Sizes(exposures=30_000, warmup=5, steps=40, repeats=2)


# ---------------------------------------------------------------------------- step part
def demo_batches(config: StreamtrainConfig, exposures: int) -> list[SampleBatch]:
    """The demo world's samples, joined by one joiner, cut into the daemon's batches."""
    sim = config.simulator.model_copy(update={"exposures": exposures})
    partitions = 2
    logs: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
    for event in EventStream(sim):
        logs[partition_of(event.key.decode(), partitions)].append(event.value)
    ingest = config.ingest()
    pipeline = build_pipeline(ingest, producer=None, source=ListSource(logs, end_of_input=True))  # type: ignore[arg-type]
    pipeline.dlq = ListDlqSink()
    buffer = SampleBuffer(config.trainer.batch_size)
    while not pipeline.end_of_input:
        for batch in pipeline.poll(5_000):
            buffer.extend(batch)
    batches = []
    while (batch := buffer.pop_batch()) is not None:
        batches.append(batch)
    return batches


def _time_steps(trainer: Any, batches: list[SampleBatch], sizes: Sizes, comm: Comm) -> dict[str, Any]:
    """Wall seconds and communication of each timed step (after the warm-up)."""
    for batch in batches[: sizes.warmup]:
        trainer.step(batch)
    comm.take_stats()
    walls, comm_s, sent, received, by_op = [], [], [], [], {}
    for batch in batches[sizes.warmup: sizes.warmup + sizes.steps]:
        started = time.perf_counter()
        trainer.step(batch)
        walls.append(time.perf_counter() - started)
        stats = comm.take_stats()
        comm_s.append(stats.seconds)
        sent.append(sum(o.bytes_sent for o in stats.ops.values()))
        received.append(sum(o.bytes_received for o in stats.ops.values()))
        for op, o in stats.ops.items():
            total = by_op.setdefault(op, [0, 0.0])
            total[0] += o.bytes_sent + o.bytes_received
            total[1] += o.seconds
    n = len(walls)
    return {"wall_s": walls, "comm_s": comm_s, "sent": sent, "received": received,
            "by_op": {op: {"bytes_per_step": b / n, "ms_per_step": 1000 * s / n} for op, (b, s) in by_op.items()}}


def _rank_main(rank: int, world: int, port: int, folder_name: str) -> None:
    """One worker process of the step part: joins like a ``--workers`` rank, times its steps."""
    folder = Path(folder_name)
    sizes = Sizes(**yaml.safe_load((folder / "sizes.yaml").read_text()))
    os.environ.update(rank_environment(os.environ, rank, world, port, 0))
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)
    config = StreamtrainConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    batches = [unpack_state(p.read_bytes()) for p in sorted(folder.glob("batch-*.state"))]
    comm = connect(Membership.from_env(), torch.device("cpu"), timeout_s=300)
    try:
        trainer = build_trainer(config, torch.device("cpu"), embedding=partial(ShardedDynamicEmbedding, comm=comm),
                                replicas=RowReplicas(comm))
        result = _time_steps(trainer, batches, sizes, comm)
        (folder / f"rank{rank}.state").write_bytes(pack_state({"result": result}))
    finally:
        disconnect()


def run_workers(folder: Path, world: int) -> dict[str, Any]:
    """One timed run of ``world`` worker processes; rank 0's measurements."""
    rendezvous = LocalRendezvous(world, timeout_s=300)
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=_rank_main, args=(r, world, rendezvous.port, str(folder))) for r in range(world)]
    try:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    finally:
        rendezvous.close()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"worker processes exited with {[p.exitcode for p in procs]}")
    return unpack_state((folder / "rank0.state").read_bytes())["result"]


def run_plain(config: StreamtrainConfig, batches: list[SampleBatch], sizes: Sizes, threads: int) -> dict[str, Any]:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time_steps(build_trainer(config, torch.device("cpu")), batches, sizes, Comm())
    finally:
        torch.set_num_threads(before)


def step_part(config: StreamtrainConfig, sizes: Sizes, folder: Path) -> dict[str, Any]:
    batches = demo_batches(config, sizes.exposures)
    needed = sizes.warmup + sizes.steps
    if len(batches) < needed:
        raise RuntimeError(f"{len(batches)} batches from {sizes.exposures} exposures, {needed} needed")
    batches = batches[:needed]
    (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    (folder / "sizes.yaml").write_text(yaml.safe_dump(sizes.__dict__))
    for i, batch in enumerate(batches):
        (folder / f"batch-{i:04d}.state").write_bytes(pack_state(batch))
    contenders = {
        "plain, 1 thread": lambda i: run_plain(config, batches, sizes, 1),
        "plain, 2 threads": lambda i: run_plain(config, batches, sizes, 2),
        "1 worker": lambda i: run_workers(folder, 1),
        "2 workers": lambda i: run_workers(folder, 2),
    }
    runs = interleaved(contenders, sizes.repeats)
    batch_size = config.trainer.batch_size
    out: dict[str, Any] = {"batch_size": batch_size, "steps": sizes.steps, "repeats": sizes.repeats, "contenders": {}}
    for name, results in runs.items():
        best = min(results, key=lambda r: statistics.median(r["wall_s"]))
        wall = statistics.median(best["wall_s"])
        comm = statistics.median(best["comm_s"])
        out["contenders"][name] = {
            "samples_per_s": batch_size / wall, "step_ms": 1000 * wall, "comm_ms": 1000 * comm,
            "compute_ms": 1000 * (wall - comm),
            "bytes_per_step": statistics.median(s + r for s, r in zip(best["sent"], best["received"])),
            "by_op": best["by_op"],
        }
    return out


# ---------------------------------------------------------------------------- daemon part
def daemon_part(setup: DemoSetup, sizes: Sizes, folder: Path) -> dict[str, Any]:
    topic = f"scale-{time.time_ns()}"
    kafka = setup.config(folder / "produce", topic).kafka
    create_topics(kafka.bootstrap_servers, [kafka.topic, kafka.dlq_topic], kafka.partitions)
    sim = setup.config(folder / "produce", topic).simulator.model_copy(
        update={"rate": 0.0, "time_scale": 0.0, "exposures": sizes.exposures})
    run_simulation(sim, KafkaSink(kafka.bootstrap_servers, kafka.topic, mark_end=True))  # ends: every sample trains
    modes = {"plain": [], "1 worker": ["--workers", "1"], "2 workers": ["--workers", "2"]}

    def run(name: str, extra: tuple[str, ...], i: int) -> dict[str, Any]:
        run_dir = folder / f"{name.replace(' ', '-')}-{i}{'-start' if extra else ''}"
        config = setup.config(run_dir, topic, publishing={"every_samples": 10**9})  # no releases: workers do not publish
        path = run_dir.with_suffix(".yaml")
        run_dir.mkdir(parents=True)
        path.write_text(yaml.safe_dump(config.to_dict()))
        started = time.perf_counter()
        with open(run_dir / "log", "wb") as log:
            code = subprocess.run([sys.executable, "-m", "streamtrain", "--log-format", "json", "--log-level", "WARNING",
                                   "run", "--config", str(path), *modes[name], *extra], stdout=log, stderr=subprocess.STDOUT,
                                  timeout=1800).returncode
        wall = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"{name} exited {code}: {(run_dir / 'log').read_text()[-2000:]}")
        with CheckpointStore(config.checkpoints.root, readonly=True) as store:
            samples = int(store.load().components["trainer"]["samples"])
        return {"samples": samples, "wall_s": wall}

    # Start-up alone: the same command stopped before its first sample (start, join, restore, checkpoint, exit).
    contenders = {name: partial(run, name, ()) for name in modes} | {
        f"{name}, start-up": partial(run, name, ("--stop-after-samples", "0")) for name in modes}
    runs = interleaved(contenders, sizes.repeats)
    out = {}
    for name in modes:
        best = min(runs[name], key=lambda r: r["wall_s"])
        start = min(r["wall_s"] for r in runs[f"{name}, start-up"])
        out[name] = {"samples": best["samples"], "wall_s": best["wall_s"], "start_s": start,
                     "samples_per_s": best["samples"] / best["wall_s"],
                     "samples_per_s_after_start": best["samples"] / max(1e-9, best["wall_s"] - start)}
    return out


# ---------------------------------------------------------------------------- main
def report(results: dict[str, Any]) -> None:
    line = "-" * 100
    if (r := results.get("step")) is not None:
        print(line)
        print(f"step: demo model, batch {r['batch_size']}, median of {r['steps']} steps, best of {r['repeats']}; "
              "rank 0's figures; bytes = sent + received by rank 0")
        print(f"  {'contender':<22}{'samples/s':>11}{'ms/step':>10}{'compute ms':>12}{'comm ms':>10}{'KiB/step':>11}")
        for name, c in r["contenders"].items():
            print(f"  {name:<22}{c['samples_per_s']:>11,.0f}{c['step_ms']:>10.1f}{c['compute_ms']:>12.1f}"
                  f"{c['comm_ms']:>10.1f}{c['bytes_per_step'] / 1024:>11,.0f}")
        for op, o in r["contenders"]["2 workers"]["by_op"].items():
            print(f"    2 workers, {op:<12} {o['bytes_per_step'] / 1024:>9,.0f} KiB/step {o['ms_per_step']:>7.1f} ms/step")
    if (r := results.get("daemon")) is not None:
        print(line)
        print("daemon: streamtrain run to the end of a pre-produced log; whole command, and without its start-up "
              "(the same command stopped before its first sample)")
        print(f"  {'command':<22}{'samples/s':>11}{'after start-up':>16}{'start-up s':>12}{'wall s':>9}")
        for name, d in r.items():
            print(f"  {name:<22}{d['samples_per_s']:>11,.0f}{d['samples_per_s_after_start']:>16,.0f}"
                  f"{d['start_s']:>12.1f}{d['wall_s']:>9.1f}   ({d['samples']:,} samples)")


def main(argv: list[str] | None = None) -> None:
    cli = parser(__doc__, "6k exposures, 8 timed steps, one repeat")
    cli.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    cli.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=V")
    args = cli.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.quick:
        announce_quick(sizes)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, EmbeddedBroker(log_dir=Path(tmp)) as broker:
        setup = DemoSetup.load(broker, args.overrides)
        if "step" in args.parts:
            folder = Path(tmp) / "step"
            folder.mkdir()
            config = build_config(read_demo_config(), {"run_dir": str(folder)}, flag_overrides(args.overrides))
            results["step"] = step_part(config, sizes, folder)
        if "daemon" in args.parts:
            results["daemon"] = daemon_part(setup, sizes, Path(tmp) / "daemon")
    report(results)
    step = results.get("step", {}).get("contenders", {})
    daemon = results.get("daemon", {})
    two = step.get("2 workers", {})
    print_result({
        "benchmark": "scale",
        # End to end after start-up when the daemon part ran, else the step part's.
        "samples_per_s_1": rounded(daemon.get("1 worker", {}).get("samples_per_s_after_start")
                                   or step.get("1 worker", {}).get("samples_per_s"), 1),
        "samples_per_s_2": rounded(daemon.get("2 workers", {}).get("samples_per_s_after_start") or two.get("samples_per_s"), 1),
        "samples_per_s_single_process": rounded(daemon.get("plain", {}).get("samples_per_s_after_start"), 1),
        "daemon": {k: {m: rounded(v, 2) for m, v in d.items()} for k, d in daemon.items()},
        "bytes_per_step": two.get("bytes_per_step"),
        "step_ms_2": rounded(two.get("step_ms")), "compute_ms_2": rounded(two.get("compute_ms")),
        "comm_ms_2": rounded(two.get("comm_ms")),
        "step_samples_per_s": {k: rounded(v["samples_per_s"], 1) for k, v in step.items()},
        "quick": args.quick, "machine": machine_info(with_torch=True),
    })


if __name__ == "__main__":
    main()
