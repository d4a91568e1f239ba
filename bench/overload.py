"""Overload: freshness when the daemon is offered more than it can train, down-sampling off
beside on, in the same run (part of ``bench.daemon``).

The offered rate is ``factor`` (1.5) times the daemon's capacity measured in the same run
(the throughput part's samples/s of the daemon draining a pre-produced log, or a quick
throughput run of its own), converted to events/s with the demo world's events per
exposure. Two freshness runs (``bench.freshness``) follow at that rate, on fresh topics:

* **off** (``overload.mode=off``, the baseline): every sample is trained; the backlog and
  freshness grow for as long as the overload lasts;
* **auto** (``overload.mode=auto``): the daemon halves the keep-rate of unclicked
  exposures at a checkpoint while its backlog is long and growing. The benchmark's runs
  last seconds, not hours, so the auto thresholds are scaled down to match (``AUTO``:
  backlog 2 s / 0.5 s, a decision every 2 s over 1 s windows, printed in the JSON); the
  defaults (30 s / 5 s / 15 s / 5 s) are the same policy for runs that last.

Reported for both: p50/p99/max freshness of the trained exposures, how many measured
exposures were dropped, the lowest and the final keep-rate.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench import freshness, throughput
from bench.demo_setup import DemoSetup
from streamtrain.simulator import EventStream

FACTOR = 1.5
AUTO = {"mode": "auto", "backlog_high_s": 2.0, "backlog_low_s": 0.5, "decide_every_s": 2.0, "window_s": 1.0,
        "alarm_backlog_s": 10.0}


@dataclass(frozen=True)
class Sizes:
    freshness: freshness.Sizes  # of each of the two runs
    capacity: throughput.Sizes  # when the throughput part did not run


QUICK = Sizes(freshness.Sizes(seconds=4.0, warmup_s=1.0), throughput.QUICK)
FULL = Sizes(freshness.Sizes(seconds=60.0, warmup_s=5.0), throughput.FULL)


def events_per_exposure(demo: DemoSetup, tmp: Path) -> float:
    """Events per exposure of the demo world (a dry run of its first 20,000 events)."""
    sim = demo.config(tmp / "dry", "dry").simulator.model_copy(update={"exposures": None})
    stream = iter(EventStream(sim))
    types = [orjson.loads(next(stream).value)["type"] for _ in range(20_000)]
    return len(types) / types.count("exposure")


def run(demo: DemoSetup, tmp: Path, sizes: Sizes, *, time_scale: float, capacity: float | None) -> dict[str, Any]:
    """``capacity``: the daemon's samples/s from this run's throughput part (None: measure it)."""
    if capacity is None:
        capacity = throughput.run(demo, tmp / "capacity", sizes.capacity)["samples_per_s"]
        gc.collect()
    rate = FACTOR * capacity * events_per_exposure(demo, tmp)
    runs = {}
    for name, overload in (("off", {"mode": "off"}), ("auto", AUTO)):
        runs[name] = freshness.run(demo, tmp / name, sizes.freshness, rate=rate, time_scale=time_scale,
                                   layers={"overload": overload}, topic=f"bench-overload-{name}")
        gc.collect()
    return {"capacity_samples_per_s": capacity, "factor": FACTOR, "rate": rate, "auto_config": AUTO, **runs}
