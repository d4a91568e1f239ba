"""Daemon throughput on a pre-produced log, beside a bare ``Trainer.step`` loop (part of ``bench.daemon``).

A log of seeded simulator events (the demo world) is produced first; the daemon then
consumes it as fast as it can: poll -> decode -> join -> fixed-size batches -> prequential
scoring -> monitors -> train -> releases/checkpoints when due. samples/s = samples trained
between the end of the first and of the last step / the wall time between them (start-up
and the shutdown checkpoint left out; the whole run's rate is reported too). Baseline: the
same batches, captured from the first run, replayed through a fresh ``Trainer`` (same
config, seed, threads) in a bare ``Trainer.step`` loop -- the ceiling, with no Kafka, join,
monitors, releases or checkpoints. Daemon and baseline runs are interleaved, best of each;
``ratio`` = ours / baseline. ``shares`` split the daemon's wall time, in the same run, into
its ``Trainer.step`` calls (prequential observers included: ``step_share``), polls,
checkpoints, releases and the rest.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import interleaved
from bench.daemon_probes import CallTimer, StepClock, clock_hooks, seconds_within
from bench.demo_setup import DemoSetup, produce_log
from streamtrain.config import StreamtrainConfig
from streamtrain.runtime import Daemon
from streamtrain.trainer import build_trainer

# The last click window of event time (~2,800 exposures of the demo world) never closes:
# the daemon stops this many exposures short of the log's end, at a batch boundary.
UNCLOSED_TAIL = 4_000


@dataclass(frozen=True)
class Sizes:
    exposures: int  # in the pre-produced log
    repeats: int  # interleaved daemon / baseline runs


QUICK = Sizes(exposures=16_000, repeats=1)
FULL = Sizes(exposures=100_000, repeats=2)


def watchdog(stop: threading.Event, clock: StepClock, idle_s: float) -> threading.Thread:
    """Stop the daemon if no step ends for ``idle_s`` (the log ran dry before the stop point)."""

    def watch() -> None:
        started = time.perf_counter()
        while not stop.wait(0.5):
            with clock.lock:
                last = clock.ends[-1] if clock.ends else started
            if time.perf_counter() - last > idle_s:
                print(f"  (watchdog: no step for {idle_s:.0f} s, stopping the daemon)", file=sys.stderr)
                stop.set()

    thread = threading.Thread(target=watch, name="watchdog", daemon=True)
    thread.start()
    return thread


def daemon_pass(cfg: StreamtrainConfig, target: int, keep_batches: bool) -> tuple[dict[str, Any], StepClock]:
    """One daemon from a fresh run dir over the whole log, up to ``target`` samples."""
    stop = threading.Event()
    clock = StepClock(keep_batches=keep_batches)
    polls: list[tuple[float, float]] = []  # consume, decode, join, DLQ
    daemon = Daemon(cfg, stop=stop, stop_after_samples=target, hooks=clock_hooks(clock, poll_spans=polls))
    # Where the rest of the loop's time goes (none of these overlap Trainer.step).
    timers = {"checkpoint": CallTimer(daemon, "checkpoint"),
              "release": CallTimer(daemon.releases, "publish_pending")}  # version files + shadow copy
    watchdog(stop, clock, idle_s=20.0)
    started = time.perf_counter()
    summary = daemon.run()
    wall = time.perf_counter() - started
    stop.set()
    ends = np.array(clock.ends)
    if len(ends) < 3:
        raise RuntimeError(f"throughput run trained only {len(ends)} steps")
    batch = cfg.trainer.batch_size
    window = ends[-1] - ends[0]  # end of the first step -> end of the last one
    step_share = float(np.sum(clock.durations[1:])) / window
    shares = {"train_step": step_share, "poll": seconds_within(polls, ends[0], ends[-1]) / window}
    shares |= {k: t.within(ends[0], ends[-1]) / window for k, t in timers.items()}
    shares["other"] = 1.0 - sum(shares.values())
    out = {"samples_per_s": batch * (len(ends) - 1) / window, "step_share": step_share, "shares": shares,
           "step_ms": 1000 * float(np.median(clock.durations)), "run_wall_s": wall,
           "run_samples_per_s": summary.samples_trained / wall, "samples_trained": summary.samples_trained,
           "steps": summary.steps, "checkpoints": summary.checkpoints, "releases": summary.published_versions}
    del daemon
    return out, clock


def bare_pass(cfg: StreamtrainConfig, batches: list[dict[str, np.ndarray]]) -> float:
    """samples/s of a fresh Trainer (same config, seed, threads) stepping through ``batches``."""
    torch.set_num_threads(cfg.trainer.threads)
    trainer = build_trainer(cfg, torch.device("cpu"))
    ends = []
    for batch in batches:
        trainer.step(batch)
        ends.append(time.perf_counter())
    return cfg.trainer.batch_size * (len(ends) - 1) / (ends[-1] - ends[0])


def run(demo: DemoSetup, tmp: Path, sizes: Sizes) -> dict[str, Any]:
    cfg = demo.config(tmp / "tput", "bench-tput")
    produced = produce_log(cfg, sizes.exposures)
    batch = cfg.trainer.batch_size
    target = (sizes.exposures - UNCLOSED_TAIL) // batch * batch
    batches: list[dict[str, np.ndarray]] = []  # what the daemon trained, captured from its first run

    def ours(r: int) -> dict[str, Any]:
        result, clock = daemon_pass(demo.config(tmp / f"tput-{r}", "bench-tput"), target, keep_batches=r == 0)
        batches.extend(clock.batches)
        del clock
        gc.collect()
        return result

    def baseline(_: int) -> float:
        rate = bare_pass(cfg, batches)
        gc.collect()
        return rate

    # Round 0 runs ours first: the baseline replays the batches it captured.
    runs = interleaved({"ours": ours, "baseline": baseline}, sizes.repeats)
    best = max(runs["ours"], key=lambda o: o["samples_per_s"])
    bare = runs["baseline"]
    hist = [float(b["hist_len"].mean()) for b in batches]
    return {
        **best, "repeats": len(runs["ours"]), "all_samples_per_s": [o["samples_per_s"] for o in runs["ours"]],
        "exposures_produced": produced["exposures"], "events_produced": produced["events"],
        "baseline_samples_per_s": max(bare), "all_baseline_samples_per_s": bare,
        "ratio": best["samples_per_s"] / max(bare), "threads": cfg.trainer.threads, "batch_size": batch,
        "mean_hist_len": float(np.mean(hist)), "last_hist_len": float(np.mean(hist[-10:])),
    }
