"""End-to-end benchmark of the training daemon on the demo model, beside its baselines.

    python -m bench.daemon [--quick] [--parts throughput freshness overload checkpoint restart]
                           [--rate EVENTS_PER_S] [--time-scale X] [--rows N] [--set SECTION.FIELD=V ...]

Everything runs on this machine against an embedded broker (Tansu, in memory) that the
benchmark starts itself. The daemon is ``streamtrain.runtime.Daemon`` with the demo's
configuration (``configs/demo.yaml``, the file ``streamtrain demo`` reads: model,
embeddings, batch 256, joiner ``emit_then_correct`` with a 10 min click window, monitors,
checkpoint and release cadence, the default ``trainer.threads``) in a temporary run
directory, without Redis (the demo's tables never evict at this size, so the cold tier
would not be touched). ``--set`` overrides any of it (all parts). Five parts, one module
each (their docstrings say what is measured and against what):

* **throughput** (``bench.throughput``) -- samples/s of the daemon draining a
  pre-produced log, beside a bare ``Trainer.step`` loop over the same batches;
* **freshness** (``bench.freshness``) -- exposure produced -> trained while the simulator
  produces at ``--rate``, split into the label-window wait and the pipeline;
* **overload** (``bench.overload``) -- freshness offered 1.5x the daemon's capacity measured
  in the same run, overload down-sampling off (baseline) beside auto;
* **checkpoint** (``bench.checkpoint``) -- save and restore of an N x 64 embedding table
  through ``CheckpointStore``, beside ``torch.save`` / ``torch.load`` and raw bytes;
* **restart** (``bench.restart``) -- ``streamtrain run`` SIGKILLed and started again:
  spawn -> first trained batch, beside the interpreter + imports floor.

``--quick`` runs smaller sizes and says so: 12k samples, an 8 s freshness run, two 4 s
overload runs, 100k rows, one repeat of the throughput pair. The timings inside the daemon come from
``bench.daemon_probes``. The last line printed is one JSON object.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import checkpoint, freshness, overload, restart, throughput
from bench.common import announce_quick, machine_info, parser, print_result, rounded
from bench.demo_setup import DemoSetup, broker_state
from streamtrain.services import EmbeddedBroker

MODULES = {"throughput": throughput, "freshness": freshness, "overload": overload, "checkpoint": checkpoint,
           "restart": restart}
PARTS = tuple(MODULES)


# ---------------------------------------------------------------------------- report
def row(label: str, *cells: str, width: int = 46) -> None:
    print(f"  {label:<{width}}" + "".join(f"{c:>11}" for c in cells))


def report(results: dict[str, Any]) -> None:
    """The human-readable tables, one per part that ran."""
    line = "-" * 78
    if (r := results.get("throughput")) is not None:
        print(line)
        print(f"throughput: demo model, pre-produced log of {r['exposures_produced']:,} exposures "
              f"({r['events_produced']:,} events), {r['samples_trained']:,} samples trained in "
              f"{r['steps']} steps of {r['batch_size']}; mean history length {r['mean_hist_len']:.1f} (last batches "
              f"{r['last_hist_len']:.1f}); {r['checkpoints']} checkpoint(s), {r['releases']} release(s); "
              f"torch threads {r['threads']}; best of {r['repeats']}")
        row("", "samples/s", "ms/step")
        for label, rate in (("daemon, end to end (ours)", r["samples_per_s"]),
                            ("bare Trainer.step loop (baseline)", r["baseline_samples_per_s"])):
            row(label, f"{rate:,.0f}", f"{1000 * r['batch_size'] / rate:.1f}")
        shares = ", ".join(f"{k} {100 * v:.1f} %" for k, v in r["shares"].items())
        print(f"  ratio ours/baseline {r['ratio']:.2f}; daemon wall time: {shares}; median Trainer.step in the "
              f"daemon {r['step_ms']:.1f} ms; whole run incl. start-up and final checkpoint "
              f"{r['run_samples_per_s']:,.0f} samples/s; all repeats: ours "
              + " / ".join(f"{v:,.0f}" for v in r["all_samples_per_s"]) + ", baseline "
              + " / ".join(f"{v:,.0f}" for v in r["all_baseline_samples_per_s"]))
    if (r := results.get("freshness")) is not None:
        print(line)
        print(f"freshness: {r['produced_events_per_s']:,.0f} events/s produced for {r['produce_s']:.0f} s "
              f"(--rate {r['rate']:g}), event time x{r['event_seconds_per_wall_s']:,.0f} -> click window + "
              f"lateness = {r['window_wall_s']:.2f} s of wall time; {r['measured']:,} exposures measured, "
              f"{r['missing']} never trained, {r['dropped']} dropped by overload down-sampling (keep-rate min "
              f"{r['keep_rate_min']:.3g}); {r['checkpoints']} checkpoint(s), {r['releases']} release(s)")
        row("", "p50 s", "p99 s")
        for label, key in (("exposure produced -> trained (ours)", "freshness"),
                           ("  of which label-window wait (floor)", "label_wait"),
                           ("  window closed -> trained (pipeline)", "pipeline"),
                           ("    closed -> emitted by the joiner", "to_emitted"),
                           ("    emitted -> trained", "emitted_to_trained")):
            row(label, f"{r[key + '_p50_s']:.3f}", f"{r[key + '_p99_s']:.3f}")
    if (r := results.get("overload")) is not None:
        print(line)
        print(f"overload: offered {r['factor']:g} x the daemon's capacity of {r['capacity_samples_per_s']:,.0f} "
              f"samples/s = {r['rate']:,.0f} events/s; down-sampling off vs auto (bench thresholds: backlog "
              f"{r['auto_config']['backlog_high_s']:g} s / {r['auto_config']['backlog_low_s']:g} s)")
        row("", "p50 s", "p99 s", "max s", "dropped", "keep min", "keep end")
        for label, key in (("mode=off (baseline)", "off"), ("mode=auto (ours)", "auto")):
            o = r[key]
            row(label, f"{o['freshness_p50_s']:.2f}", f"{o['freshness_p99_s']:.2f}", f"{o['freshness_max_s']:.2f}",
                f"{o['dropped']:,}", f"{o['keep_rate_min']:.3g}", f"{o['keep_rate_final']:.3g}")
        print(f"  measured exposures: off {r['off']['measured']:,} ({r['off']['missing']} never trained), "
              f"auto {r['auto']['measured']:,} ({r['auto']['missing']} never trained)")
    if (r := results.get("checkpoint")) is not None:
        p = r["parts_best_s"]
        print(line)
        print(f"checkpoint: one table of {r['rows']:,} rows x {r['dim']} (weights + Adagrad slot + keys/scores), "
              f"{r['bytes'] / 2**20:,.0f} MiB on disk, fsync on, best of {r['repeats']} "
              f"(median save {r['ckpt_save_median_s']:.2f} s, restore {r['ckpt_restore_median_s']:.2f} s)")
        row("", "save s", "restore s")
        row("CheckpointStore (ours)", f"{r['ckpt_save_s']:.3f}", f"{r['ckpt_restore_s']:.3f}")
        row("  state_dict copy | store.load (sha256, read)", f"{p['state_dict']:.3f}", f"{p['store_load']:.3f}")
        row("  store.save | load_state_dict (copy, index)", f"{p['store_save']:.3f}", f"{p['load_state_dict']:.3f}")
        row("torch.save+fsync | torch.load (baseline)", f"{r['torch_save_s']:.3f}", f"{r['torch_load_s']:.3f}")
        row("raw bytes write+fsync | read (floor)", f"{r['raw_write_s']:.3f}", f"{r['raw_read_s']:.3f}")
    if (r := results.get("restart")) is not None:
        print(line)
        print(f"restart after SIGKILL: `python -m streamtrain run` killed after {r['killed_at']}, restarted; "
              f"first trained batch -> {r['resumed_at']}")
        row("", "s")
        row("spawn -> first trained batch (ours)", f"{r['restart_s']:.2f}")
        if r["spawn_to_resumed_s"] is not None:
            row("  spawn -> 'resumed from' log line", f"{r['spawn_to_resumed_s']:.2f}")
            row("  'resumed from' -> first trained batch", f"{r['resumed_to_trained_s']:.2f}")
        row(f"python -c 'import {r['baseline_import']}' (floor)", f"{r['baseline_import_s']:.2f}")
    print(line)


def run_parts(parts: list[str], sizes: dict[str, Any], overrides: list[str], rate: float,
              time_scale: float) -> dict[str, Any]:
    """Run the chosen parts (checkpoint first, alone; the others on one shared broker)."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-daemon-") as tmp_dir:
        tmp = Path(tmp_dir)
        if "checkpoint" in parts:
            results["checkpoint"] = checkpoint.run(tmp, sizes["checkpoint"])
            gc.collect()
        if set(parts) - {"checkpoint"}:
            with EmbeddedBroker() as broker:
                demo = DemoSetup.load(broker, overrides)
                try:
                    if "throughput" in parts:
                        results["throughput"] = throughput.run(demo, tmp, sizes["throughput"])
                    if "freshness" in parts:
                        results["freshness"] = freshness.run(demo, tmp, sizes["freshness"], rate=rate,
                                                             time_scale=time_scale)
                    if "overload" in parts:
                        capacity = results.get("throughput", {}).get("samples_per_s")
                        results["overload"] = overload.run(demo, tmp, sizes["overload"], time_scale=time_scale,
                                                           capacity=capacity)
                    if "restart" in parts:
                        results["restart"] = restart.run(demo, tmp, sizes["restart"])
                except BaseException:
                    print(f"failed; {broker_state(broker)}", file=sys.stderr)
                    raise
                gc.collect()  # drop Kafka clients before the broker goes
    return results


def main() -> None:
    cli = parser(__doc__, "smaller sizes (35-40 s on an idle 2-core machine)")
    cli.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    cli.add_argument("--rate", type=float, default=2000.0,
                     help="freshness: events per wall second (default 2000, the demo's)")
    cli.add_argument("--time-scale", type=float, default=1000.0,
                     help="freshness: event seconds per wall second (default 1000: the 10 min click window "
                          "lasts 0.6 s)")
    cli.add_argument("--rows", type=int, default=None, help="checkpoint: table rows (default 1M, quick 100k)")
    cli.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                     help="override a daemon config value on top of configs/demo.yaml (repeatable; printed in "
                          "the JSON)")
    args = cli.parse_args()
    sizes = {name: module.QUICK if args.quick else module.FULL for name, module in MODULES.items()}
    if args.rows:
        sizes["checkpoint"] = dataclasses.replace(sizes["checkpoint"], rows=args.rows)
    if args.quick:
        announce_quick(sizes)

    results = run_parts(args.parts, sizes, args.overrides, args.rate, args.time_scale)
    report(results)

    t, f, o, c, r = (results.get(k, {}) for k in PARTS)
    print_result({
        "benchmark": "daemon", "quick": args.quick, "overrides": args.overrides,
        "samples_per_s": rounded(t.get("samples_per_s"), 1),
        "baseline_samples_per_s": rounded(t.get("baseline_samples_per_s"), 1),
        "ratio": rounded(t.get("ratio")), "step_share": rounded(t.get("step_share")),
        "daemon_time_shares": {k: rounded(v) for k, v in t.get("shares", {}).items()} or None,
        "freshness_p50_s": rounded(f.get("freshness_p50_s")), "freshness_p99_s": rounded(f.get("freshness_p99_s")),
        "label_wait_p50_s": rounded(f.get("label_wait_p50_s")), "label_wait_p99_s": rounded(f.get("label_wait_p99_s")),
        "pipeline_p50_s": rounded(f.get("pipeline_p50_s")), "pipeline_p99_s": rounded(f.get("pipeline_p99_s")),
        "to_emitted_p50_s": rounded(f.get("to_emitted_p50_s")), "to_emitted_p99_s": rounded(f.get("to_emitted_p99_s")),
        "freshness_missing": f.get("missing"), "freshness_dropped": f.get("dropped"), "produced_events_per_s": rounded(f.get("produced_events_per_s"), 1),
        "overload": None if not o else {
            "capacity_samples_per_s": rounded(o["capacity_samples_per_s"], 1), "offered_events_per_s": rounded(o["rate"], 1),
            "factor": o["factor"], "auto_config": o["auto_config"],
            **{f"{mode}_{k}": rounded(o[mode][k]) for mode in ("off", "auto")
               for k in ("freshness_p50_s", "freshness_p99_s", "freshness_max_s", "keep_rate_min", "keep_rate_final")},
            **{f"{mode}_{k}": o[mode][k] for mode in ("off", "auto") for k in ("measured", "dropped", "missing")}},
        "ckpt_save_s": rounded(c.get("ckpt_save_s")), "ckpt_restore_s": rounded(c.get("ckpt_restore_s")),
        "torch_save_s": rounded(c.get("torch_save_s")), "torch_load_s": rounded(c.get("torch_load_s")),
        "raw_write_s": rounded(c.get("raw_write_s")), "raw_read_s": rounded(c.get("raw_read_s")),
        "restart_s": rounded(r.get("restart_s")), "restart_to_resumed_s": rounded(r.get("spawn_to_resumed_s")),
        "baseline_import_s": rounded(r.get("baseline_import_s")),
        "sizes": {"tput_samples": t.get("samples_trained"), "tput_exposures": t.get("exposures_produced"),
                  "fresh_rate": f.get("rate"), "fresh_time_scale": f.get("time_scale"),
                  "fresh_seconds": sizes["freshness"].seconds if f else None, "fresh_measured": f.get("measured"),
                  "ckpt_rows": c.get("rows"), "ckpt_dim": c.get("dim"), "ckpt_bytes": c.get("bytes"),
                  "restart_exposures": sizes["restart"].exposures if r else None},
        "machine": machine_info(with_torch=True, torch_threads=t.get("threads"),
                                loadavg=[round(x, 2) for x in os.getloadavg()]),
    })


if __name__ == "__main__":
    main()
