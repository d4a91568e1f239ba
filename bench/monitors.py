"""Drift detection through the real daemon: delay per drift kind, false freezes, overhead.

    python -m bench.monitors [--quick] [--seeds 0,1,2,3,4]

Starts its own embedded broker. Per seed it produces the scenarios of
``tests/scenario_harness.py`` — a clean log and one log per drift kind (label shift,
feature shift, broken feature, concept shift), 40k exposures each, drift on exposures
[20k, 28k) with the onset moved by 1/len(seeds) of a window per seed (:func:`onsets`) —
and trains each with an in-process ``Daemon`` (SMALL_CONFIG model, batch 64, one torch
thread; monitor windows 1000 samples, AUC 2000; default thresholds, warm-up and
hysteresis). Reported:

* **detection delay**: samples from the drift's first sample (the first sample whose event
  time is at or after the first drifted exposure) to the first gate freeze after it, with
  the monitors' documented worst case beside it (``monitors/config.py``: "detection takes
  at most (alarm_after + 1) windows", of the monitor meant for that drift);
* **reopen**: samples from the drift's end to the gate reopening (``unfreeze: auto``);
* **false freezes**: freezes in the clean runs, and freezes before the onset in drift runs;
* **overhead**: wall time in ``MonitorSuite.update`` against the rest of ``Trainer.step``
  (forward, backward, optimizer and table updates), summed over every batch of the clean
  runs, measured by timing wrappers inside the running daemon.

``--quick`` runs one seed on shorter logs (30k exposures, drift on [16k, 22k); < 1 minute
on 2 cores). The last line is one JSON object.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import announce_quick, machine_info, parser, print_result, rounded
from streamtrain.services import EmbeddedBroker
from tests.scenario_harness import WINDOWS, Layout, Scenario, ScenarioRun, produce_scenario, run_scenario, scenarios

QUICK_SEEDS = (3,)
FULL_SEEDS = (0, 1, 2, 3, 4)
QUICK_LAYOUT = Layout(onset=16_000, duration=6_000, tail=8_000)  # the full run uses the tests' Layout()
# Releases do not change training or the monitors (shadow check off); fewer of them only
# save time here. The tests release every 512 samples to prove the gate blocks them.
BENCH_OVERRIDES: dict[str, Any] = {"publishing": {"every_samples": 4096}}


def onsets(seeds: tuple[int, ...], layout: Layout) -> dict[int, int]:
    """Drift onset (exposures) per seed, spread over one 1000-sample window.

    A freeze can only happen when a window closes, so the delay depends on where in a
    window the drift starts: from ``alarm_after`` windows (drift starting on a boundary) up
    to one window more. Shifting the onset by ``i / len(seeds)`` of a window for the i-th
    seed samples that phase evenly instead of measuring one lucky (or unlucky) alignment.
    """
    step = WINDOWS["label_ratio"] // len(seeds)
    return {seed: layout.onset + i * step for i, seed in enumerate(seeds)}


def run_all(seeds: tuple[int, ...], layout: Layout, work_dir: Path) -> list[ScenarioRun]:
    runs = []
    with EmbeddedBroker(log_dir=work_dir) as broker:
        for seed, onset in onsets(seeds, layout).items():
            for name, scenario in scenarios(dataclasses.replace(layout, onset=onset)).items():
                topic = f"bench-{name}-s{seed}"
                started = time.perf_counter()
                produce_scenario(broker.bootstrap_servers, topic, scenario, seed)
                run = run_scenario(broker.bootstrap_servers, topic, work_dir / topic, scenario, seed,
                                   overrides=BENCH_OVERRIDES)
                if run.stopped_by != "stop_after_samples":
                    raise RuntimeError(f"{topic}: the stream ran dry after {run.samples_trained} samples")
                runs.append(run)
                print(f"  seed {seed} {name:<15} {time.perf_counter() - started:5.1f}s  {_events(run)}", flush=True)
    return runs


def _events(run: ScenarioRun) -> str:
    return ", ".join(f"{t.to_state.value}@{t.sample_count}{'(' + ','.join(t.monitors) + ')' if t.monitors else ''}"
                     for t in run.transitions) or "no transitions"


def bound_samples(run: ScenarioRun, monitor: str) -> int:
    """(alarm_after + 1) windows: the window the drift starts in may still pass, then
    ``alarm_after`` bad windows raise the alarm."""
    cfg = getattr(run.config.monitors, monitor)
    return (cfg.alarm_after + 1) * cfg.window


def median(values: list[int]) -> float | None:
    return float(statistics.median(values)) if values else None


def summarise(runs: list[ScenarioRun]) -> dict[str, Any]:
    by_kind: dict[str, list[ScenarioRun]] = {}
    for run in runs:
        by_kind.setdefault(run.scenario.name, []).append(run)
    detection: dict[str, Any] = {}
    for name, group in by_kind.items():
        scenario: Scenario = group[0].scenario
        if scenario.drift is None:
            continue
        monitor = scenario.expected_monitor
        assert monitor is not None
        delays = [r.detection_delay for r in group if r.detection_delay is not None]
        reopen = [r.reopens[-1].sample_count - r.end_sample for r in group
                  if r.reopens and r.end_sample is not None and r.final_gate.value == "open"]
        caught_by = sorted({m for r in group if r.freezes for m in r.freezes[0].monitors})
        ended_frozen = sum(1 for r in group if r.final_gate.value == "frozen")
        detection[name] = {
            "monitor": monitor, "caught_by": caught_by, "detected": len(delays), "runs": len(group),
            "delays": [r.detection_delay for r in group], "median": median(delays),
            "bound": bound_samples(group[0], monitor), "window": WINDOWS[monitor],
            "reopen_after_end": reopen, "reopen_after_end_median": median(reopen), "ended_frozen": ended_frozen,
            "freezes_before_onset": sum(1 for r in group for t in r.freezes
                                        if r.onset_sample is not None and t.sample_count <= r.onset_sample),
        }
    clean = by_kind.get("clean", [])
    monitor_s = sum(sum(r.monitor_seconds) for r in clean)
    train_s = sum(r.train_seconds() for r in clean)
    batches = sum(len(r.monitor_seconds) for r in clean)
    return {
        "detection": detection,
        "false_freezes": sum(len(r.freezes) for r in clean),
        "clean_runs": len(clean),
        "clean_samples": sum(r.samples_trained for r in clean),
        "batch_size": runs[0].config.trainer.batch_size,
        "overhead_fraction": monitor_s / train_s if train_s else None,
        "monitor_us_per_batch": 1e6 * monitor_s / batches if batches else None,
        "train_ms_per_batch": 1e3 * train_s / batches if batches else None,
    }


def print_table(summary: dict[str, Any], seeds: tuple[int, ...]) -> None:
    print(f"\nDetection (seeds {', '.join(map(str, seeds))}; delay in samples after the drift's first sample)")
    header = (f"{'drift':<15} {'meant for':<13} {'frozen by':<20} {'detected':>8} {'median':>7}  {'per seed':<32} "
              f"{'bound':>6}  reopen")
    print(header)
    print("-" * len(header))
    for name, d in summary["detection"].items():
        per_seed = ", ".join("-" if v is None else str(v) for v in d["delays"])
        med = "-" if d["median"] is None else f"{d['median']:.0f}"
        reopen = "-" if d["reopen_after_end_median"] is None else f"{d['reopen_after_end_median']:.0f}"
        if d["ended_frozen"]:
            reopen += f" ({d['ended_frozen']} frozen at end)"
        caught = ",".join(d["caught_by"]) or "-"
        print(f"{name:<15} {d['monitor']:<13} {caught:<20} {d['detected']:>4}/{d['runs']:<3} {med:>7}  {per_seed:<32} "
              f"{d['bound']:>6}  {reopen}")
    print("frozen by = monitors in the first freeze's alarm; bound = (alarm_after + 1) x window of the monitor "
          "meant for the drift (documented worst case; label drifts may pass it by the ~500-sample lag of clicked "
          "samples); reopen = median samples from the drift's end to the reopening")
    before = sum(d["freezes_before_onset"] for d in summary["detection"].values())
    print(f"\nFalse freezes: {summary['false_freezes']} in {summary['clean_runs']} clean runs "
          f"({summary['clean_samples']} samples); {before} before the onset in drift runs")
    if summary["overhead_fraction"] is not None:
        print(f"Overhead per batch of {summary['batch_size']}: monitors {summary['monitor_us_per_batch']:.0f} us "
              f"vs train step {summary['train_ms_per_batch']:.2f} ms (baseline) -> "
              f"{100 * summary['overhead_fraction']:.1f}% of the step")


def main() -> None:
    cli = parser(__doc__, f"seed {QUICK_SEEDS[0]} only, shorter logs (< 1 minute)")
    cli.add_argument("--seeds", default=None, help=f"comma-separated seeds (default {','.join(map(str, FULL_SEEDS))})")
    args = cli.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else QUICK_SEEDS if args.quick else FULL_SEEDS
    layout = QUICK_LAYOUT if args.quick else Layout()
    if args.quick:
        announce_quick({"seeds": seeds, "layout": layout})
    logging.getLogger().setLevel(logging.ERROR)  # gate transitions are logged as warnings: the table says it all

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-monitors-") as tmp:
        runs = run_all(seeds, layout, Path(tmp))
    summary = summarise(runs)
    print_table(summary, seeds)
    print(f"total {time.perf_counter() - started:.0f}s")
    print_result({
        "benchmark": "monitors", "quick": args.quick, "seeds": list(seeds), "layout": dataclasses.asdict(layout),
        "onset_per_seed": onsets(seeds, layout),
        "windows": WINDOWS, "batch_size": summary["batch_size"],
        "detection_delay": {name: d["median"] for name, d in summary["detection"].items()},
        "detection_delay_per_seed": {name: d["delays"] for name, d in summary["detection"].items()},
        "detected": {name: f"{d['detected']}/{d['runs']}" for name, d in summary["detection"].items()},
        "detection_bound": {name: d["bound"] for name, d in summary["detection"].items()},
        "reopen_after_end": {name: d["reopen_after_end_median"] for name, d in summary["detection"].items()},
        "reopen_after_end_per_seed": {name: d["reopen_after_end"] for name, d in summary["detection"].items()},
        "false_freezes": summary["false_freezes"], "clean_runs": summary["clean_runs"],
        "freezes_before_onset": sum(d["freezes_before_onset"] for d in summary["detection"].values()),
        "overhead_fraction": rounded(summary["overhead_fraction"], 4),
        "monitor_us_per_batch": rounded(summary["monitor_us_per_batch"], 1),
        "train_ms_per_batch": rounded(summary["train_ms_per_batch"], 3),
        "machine": machine_info(),
    })


if __name__ == "__main__":
    main()
