"""What every benchmark shares: its command line, interleaved best-of timing, machine facts, the JSON line.

The conventions (docs/benchmarks.md): ours is timed beside a baseline in the same run,
interleaved, and the best of the repeats is the figure -- on a shared machine other
processes only ever add time, so the least disturbed run is the repeatable one (timeit's
rule); ``--quick`` runs smaller sizes and says so; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

R = TypeVar("R")


def parser(doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """A benchmark's command line: the first paragraph of its docstring as the description,
    and ``--quick`` (``quick_help`` says what it shrinks); add the benchmark's own flags to it."""
    out = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    out.add_argument("--quick", action="store_true", help=quick_help)
    return out


def announce_quick(sizes: object) -> None:
    """The banner a ``--quick`` run prints first, so its figures are never mistaken for a full run's."""
    print(f"QUICK MODE: smaller sizes than the full run ({sizes}); figures are indicative only.", flush=True)


def interleaved(
    contenders: Mapping[str, Callable[[int], R]], rounds: int | Mapping[str, int], *, warmup: int = 0
) -> dict[str, list[R]]:
    """Call every contender once per round, in an order that rotates by one each round.

    Background load on a shared machine then lands on all of them alike instead of on
    whichever ran during a burst. ``contender(i)`` gets the round number ``i`` (which input
    to use, where to write) and returns what that run measured (seconds, a dict of
    figures...); ``rounds`` is one count for all or a count per contender (a slow one may
    run fewer rounds: it sits out the later ones). ``warmup`` untimed rounds come first
    (allocator, thread pool, lazy initialisation); their results are dropped. Round 0 runs
    in the mapping's order, so a contender may depend on one listed before it.
    """
    names = list(contenders)
    counts = {name: rounds if isinstance(rounds, int) else rounds[name] for name in names}
    for i in range(warmup):
        for name in names:
            contenders[name](i)
    results: dict[str, list[R]] = {name: [] for name in names}
    for i in range(max(counts.values(), default=0)):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            if i < counts[name]:
                results[name].append(contenders[name](i))
    return results


def timed(run: Callable[[int], object], sync: Callable[[], None] | None = None) -> Callable[[int], float]:
    """``run`` as a contender that returns its wall seconds. ``sync`` (``torch.cuda.synchronize``)
    runs before the clock starts and before it stops, so queued device work is counted where it
    belongs."""

    def contender(i: int) -> float:
        if sync is not None:
            sync()
        start = time.perf_counter()
        run(i)
        if sync is not None:
            sync()
        return time.perf_counter() - start

    return contender


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_info(*, with_torch: bool = False, **extra: Any) -> dict[str, Any]:
    """The machine a figure was measured on: CPUs, processor, Python; ``with_torch`` adds torch's
    version, its intra-op threads and whether CUDA is there; ``extra`` adds (or overrides) keys."""
    info: dict[str, Any] = {"cpus": usable_cpus(), "processor": platform.processor() or platform.machine(),
                            "python": platform.python_version()}
    if with_torch:
        import torch  # only the benchmarks that use torch pay for importing it

        info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                 "cuda": torch.cuda.is_available()}
    return info | extra


def rounded(value: float | None, digits: int = 3) -> float | None:
    """``value`` rounded for the JSON line; None (a part that did not run) stays None."""
    return None if value is None else round(float(value), digits)


def print_result(result: Mapping[str, Any]) -> None:
    """The benchmark's result as one JSON object on the last line of its output (for machines)."""
    print(json.dumps(result), flush=True)
