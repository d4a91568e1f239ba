"""``Trainer.step`` on real batches: samples/s, where a step's time goes, and how far it is from its arithmetic.

    python -m bench.trainer [--quick] [--against REV] [--repeats R] [--threads N]

Batches are the demo world's own: seeded simulator events through the joiner (warm user
histories: the first batches of a stream are skipped), cut into training batches of the
config's size. Two model configs: **demo** (``configs/demo.yaml``: dim 32, history 32,
HSTU 2 layers x 2 heads of 16) and **default** (the built-in defaults: dim 64, HSTU 2 x 2
of 32, the joiner's history of 32). One intra-op thread, as the daemon runs by default
(``--threads N``: N for every measurement, both checkouts, the floor's matmul included).

* **samples/s**: each measurement is a fresh process (``bench/trainer_child.py``) that
  builds its batches, trains the warm-up batches untimed and times the rest; repeats are
  interleaved and the best is kept (other processes only ever add time).
* ``--against REV``: the same measurement, interleaved with ours, in a ``git worktree``
  of REV (each revision builds its own batches from the same events with its own joiner);
  ``speedup_*`` = ours / theirs samples/s, measured in one run; ``cpu_speedup_*`` the same
  per CPU second of each process (``cpu_samples_per_s_*``): on a machine shared with other
  jobs, time spent waiting for a core inflates wall time but not CPU time.
* **phases**: the step's time split by ``torch.profiler`` ranges: ``Trainer.step``'s own
  (to device, forward, loss, backward, dense optimizer, sparse table update, to host) and,
  inside the forward, the embedding lookups (resolve + gather), the HSTU encoder and the
  ESMM towers with their context features (forward hooks on those modules open the ranges;
  the rest of the forward -- sequence assembly, interactions, retrieval vectors -- is
  ``forward.other``).
* **arithmetic floor**: the FLOPs of one step (``torch.utils.flop_counter.FlopCounterMode``:
  matmuls and convolutions, forward and backward) divided by the FLOP/s of a large fp32
  matmul measured in the same run on one thread; ``floor_ratio = floor time / step time``
  (1.0 would be a step that does nothing but its arithmetic at matmul speed).

The last line is one JSON object: ``samples_per_s_demo``, ``samples_per_s_default``,
``floor_ratio_demo``, ``floor_ratio_default``, ``phases`` (config -> phase -> share of the
step), and with ``--against`` ``speedup_demo``, ``speedup_default``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.flop_counter import FlopCounterMode

from bench import trainer_child
from bench.common import announce_quick, interleaved, machine_info, parser, print_result, rounded

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("demo", "default")
STEP_PHASES = ("step.to_device", "step.forward", "step.loss", "step.backward", "step.dense_optimizer",
               "step.sparse_update", "step.to_host")
# Forward parts -> the model's submodules whose forward they time ("embeddings.*": each table).
FORWARD_PARTS = {"embedding": ("embeddings.*",), "hstu": ("hstu",), "towers": ("esmm", "context")}


def run_child(checkout: Path, which: str, warmup: int, timed: int, exposures: int, threads: int = 1) -> dict[str, Any]:
    """One measurement in a fresh interpreter whose imports come from ``checkout``. The
    child script runs from a temp copy: a script inside bench/ would put bench/ first on
    sys.path, where bench/monitors.py shadows the monitors package."""
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        script = Path(tmp) / "trainer_child.py"
        shutil.copyfile(Path(trainer_child.__file__), script)
        env = {**os.environ, "PYTHONPATH": str(checkout)}
        done = subprocess.run([sys.executable, str(script), which, str(warmup), str(timed), str(exposures), str(threads)],
                              capture_output=True, text=True, cwd=tmp, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"timing {which} in {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached checkout of ``rev`` beside this repository, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="bench-against-"))
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-f", str(path), rev], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def module_ranges(model: torch.nn.Module) -> Iterator[None]:
    """Profiler ranges around the forward of the model's parts (forward hooks: public API),
    and around the encoder's ``forward_with_targets`` (the model calls that method, which
    hooks do not see) where a revision has it."""
    handles = []
    wrapped: list[torch.nn.Module] = []
    for label, names in FORWARD_PARTS.items():
        modules = [m for name in names for m in _modules(model, name)]
        for module in modules:
            ranges: list[Any] = []

            def enter(_module: Any, _args: Any, label: str = label, ranges: list[Any] = ranges) -> None:
                ranges.append(record_function(f"forward.{label}").__enter__())

            def leave(_module: Any, _args: Any, _out: Any, ranges: list[Any] = ranges) -> None:
                ranges.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
            if hasattr(module, "forward_with_targets"):
                method = module.forward_with_targets

                def ranged(*args: Any, method: Any = method, label: str = label, **kwargs: Any) -> Any:
                    with record_function(f"forward.{label}"):
                        return method(*args, **kwargs)

                module.forward_with_targets = ranged  # an instance attribute: shadows the method
                wrapped.append(module)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in wrapped:
            del module.forward_with_targets


def _modules(model: torch.nn.Module, name: str) -> list[torch.nn.Module]:
    """``name`` (``a`` or ``a.*`` for every child of ``a``) -> the submodules it names."""
    parent = getattr(model, name.removesuffix(".*"), None)
    if parent is None:
        return []
    return list(parent.children()) if name.endswith(".*") else [parent]


def phases(which: str, exposures: int, warmup: int, steps: int, threads: int = 1) -> tuple[dict[str, float], float, float]:
    """(phase -> share of the step, FLOPs of one step, mean step seconds under the profiler)."""
    torch.set_num_threads(threads)
    cfg = trainer_child.config(which, exposures)
    data = trainer_child.batches(cfg, warmup + steps + 1)
    trainer = trainer_child.trainer(cfg)
    for batch in data[:warmup]:
        trainer.step(batch)
    with FlopCounterMode(display=False) as flops:
        trainer.step(data[warmup])
    with module_ranges(trainer.model), profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in data[warmup + 1:]:
            with record_function("step"):
                trainer.step(batch)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    step_us = totals["step"]
    shares = {name.split(".", 1)[1]: totals.get(name, 0.0) / step_us for name in STEP_PHASES}
    forward = {f"forward.{label}": totals.get(f"forward.{label}", 0.0) / step_us for label in FORWARD_PARTS}
    shares |= {k: v for k, v in forward.items() if v > 0}
    shares["forward.other"] = max(0.0, shares["forward"] - sum(forward.values()))
    return ({k: round(v, 4) for k, v in shares.items()}, float(flops.get_total_flops()), step_us / 1e6 / steps)


def matmul_flops_per_s(n: int = 1024, repeats: int = 5, threads: int = 1) -> float:
    """fp32 FLOP/s of an n x n x n matmul on ``threads`` threads (best of ``repeats``)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best


def _timed(fn: Any) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    cli = parser(__doc__, "fewer batches and one repeat (about a minute; more with --against)")
    cli.add_argument("--against", metavar="REV", help="also time this git revision's Trainer.step, interleaved with ours")
    cli.add_argument("--repeats", type=int, help="interleaved measurements per checkout and config (default 3, quick 1)")
    cli.add_argument("--threads", type=int, default=1, help="torch intra-op threads of every measurement (default 1)")
    args = cli.parse_args()
    warmup, timed, exposures = (10, 30, 25_000) if args.quick else (30, 120, 60_000)
    repeats = args.repeats or (1 if args.quick else 3)
    if args.quick:
        announce_quick({"warmup": warmup, "timed": timed, "exposures": exposures, "repeats": repeats})
    result: dict[str, Any] = {"benchmark": "trainer", "quick": args.quick, "against": args.against,
                              "warmup_steps": warmup, "timed_steps": timed, "repeats": repeats, "threads": args.threads}
    with worktree(args.against) if args.against else _nothing() as theirs:
        for which in CONFIGS:
            contenders = {"ours": lambda i, w=which: run_child(REPO, w, warmup, timed, exposures, args.threads)}
            if theirs is not None:
                contenders["theirs"] = lambda i, w=which: run_child(theirs, w, warmup, timed, exposures, args.threads)
            runs = interleaved(contenders, repeats)
            ours = max(runs["ours"], key=lambda r: r["samples_per_s"])
            result[f"samples_per_s_{which}"] = rounded(ours["samples_per_s"], 1)
            result[f"step_ms_{which}"] = rounded(ours["step_ms"], 2)
            result[f"batch_size_{which}"] = ours["batch_size"]
            ours_cpu = max(r["cpu_samples_per_s"] for r in runs["ours"])
            result[f"cpu_samples_per_s_{which}"] = rounded(ours_cpu, 1)
            if theirs is not None:
                best = max(runs["theirs"], key=lambda r: r["samples_per_s"])
                result[f"theirs_samples_per_s_{which}"] = rounded(best["samples_per_s"], 1)
                result[f"speedup_{which}"] = rounded(ours["samples_per_s"] / best["samples_per_s"], 3)
                theirs_cpu = max(r["cpu_samples_per_s"] for r in runs["theirs"])
                result[f"theirs_cpu_samples_per_s_{which}"] = rounded(theirs_cpu, 1)
                result[f"cpu_speedup_{which}"] = rounded(ours_cpu / theirs_cpu, 3)
            print(f"{which}: ours {ours['samples_per_s']:,.0f} samples/s ({ours['step_ms']:.1f} ms/step)"
                  + (f", {args.against} {result[f'theirs_samples_per_s_{which}']:,.0f} samples/s: "
                     f"speedup {result[f'speedup_{which}']:.2f}x (per CPU second {result[f'cpu_speedup_{which}']:.2f}x)"
                     if theirs is not None else ""), flush=True)
    peak = matmul_flops_per_s(threads=args.threads)
    result["matmul_gflops"] = rounded(peak / 1e9, 2)
    result["phases"] = {}
    for which in CONFIGS:
        shares, flops, profiled_step_s = phases(which, exposures, warmup, min(timed, 20), args.threads)
        step_s = result[f"step_ms_{which}"] / 1000
        result["phases"][which] = shares
        result[f"step_gflop_{which}"] = rounded(flops / 1e9, 4)
        result[f"floor_ms_{which}"] = rounded(1000 * flops / peak, 3)
        result[f"floor_ratio_{which}"] = rounded(flops / peak / step_s, 4)
        print(f"{which}: {flops / 1e9:.3f} GFLOP per step -> floor {1000 * flops / peak:.2f} ms at "
              f"{peak / 1e9:.1f} GFLOP/s; step {1000 * step_s:.1f} ms; floor ratio {flops / peak / step_s:.3f}")
        print("  " + "  ".join(f"{k} {v:.1%}" for k, v in shares.items()), flush=True)
    result["machine"] = machine_info(with_torch=True, loadavg=[round(x, 2) for x in os.getloadavg()])
    print_result(result)


@contextmanager
def _nothing() -> Iterator[None]:
    yield None


if __name__ == "__main__":
    main()
