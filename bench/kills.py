"""SIGKILL a daemon process at a chosen moment, and record where the kill really landed.

A :class:`KillPlan` aims at one of three moments -- while a checkpoint is being written
(a ``.tmp-ckpt-*`` directory of *this* process exists), during start-up (before the
process's first checkpoint: at a delay after spawn, or after the restore ended), or
between checkpoints (a delay after one of its commits). :func:`supervise` runs the process,
watching its checkpoint root every millisecond, kills it when the plan says and classifies
the kill by what it saw: mid-write only if the temp directory is still there after the
process died (the write never got renamed into place), start-up if the process had
committed nothing, else between checkpoints. It also records the restart times: spawn ->
``resumed from`` log line and spawn -> each checkpoint the process committed.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import rounded
from bench.restart import log_time, read_latest
from checkpoints.manifest import TMP_PREFIX

# Where a kill lands (and what the schedule aims at).
WRITE, STARTUP, BETWEEN = "during checkpoint write", "during start-up", "between checkpoints"
WRITE_SHARE, STARTUP_SHARE = 0.3, 0.2  # of the kills; the rest between checkpoints
READY = (b"resumed from", b"starting fresh")  # the log line that ends a start's restore
POLL_S = 0.001  # the supervisor's look at the checkpoint root: a demo checkpoint write lasts tens of ms
SERVICES_CHECK_S = 1.0  # how often the supervisor checks that the broker and Redis are still there
LIFE_TIMEOUT_S = 600.0  # one daemon process, spawn to exit: far beyond any healthy one here


# ---------------------------------------------------------------------------- the schedule
@dataclass(frozen=True)
class KillPlan:
    """When to SIGKILL one daemon process (drawn before the run, from the seed)."""

    aim: str  # WRITE, STARTUP or BETWEEN
    writes_let_through: int = 0  # WRITE: checkpoint writes of this process that may finish first
    commits_first: int = 1  # BETWEEN: checkpoints this process commits before the countdown starts
    after_restore: bool = False  # STARTUP: count from the end of the restore, not from spawn
    fraction: float = 0.5  # STARTUP: of the start-up window (or of a checkpoint interval after the
    # restore); BETWEEN: of a checkpoint interval


def kill_schedule(rng: random.Random, kills: int) -> list[KillPlan]:
    """``kills`` plans, at least one of each aim, in a seeded order."""
    writes = max(1, round(kills * WRITE_SHARE))
    startups = max(1, round(kills * STARTUP_SHARE))
    aims = [WRITE] * writes + [STARTUP] * startups + [BETWEEN] * max(0, kills - writes - startups)
    rng.shuffle(aims)
    return [KillPlan(aim, rng.randrange(3), rng.randint(1, 2), rng.random() < 0.5, rng.random()) for aim in aims]


@dataclass(frozen=True)
class Pace:
    """How long things take here, measured on the reference run (scales the plans' fractions)."""

    startup_s: float  # spawn -> first committed checkpoint
    interval_s: float  # median time between two commits


# ---------------------------------------------------------------------------- one process
@dataclass
class Life:
    """One daemon process, spawn to exit."""

    plan: KillPlan | None
    log: Path
    landed: str | None = None  # where the SIGKILL landed; None: the process exited by itself
    killed_after_s: float | None = None
    ready_s: float | None = None  # spawn -> the restore ended (seen by the supervisor), when watched
    resumed_s: float | None = None  # spawn -> 'resumed from' log line (None: fresh start, or killed before)
    commits_s: list[float] = field(default_factory=list)  # spawn -> each checkpoint it committed
    exit_code: int | None = None

    @property
    def first_checkpoint_s(self) -> float | None:
        return self.commits_s[0] if self.commits_s else None

    def row(self) -> dict[str, Any]:
        return {"aim": self.plan.aim if self.plan else None, "landed": self.landed,
                "killed_after_s": rounded(self.killed_after_s), "resumed_s": rounded(self.resumed_s),
                "first_checkpoint_s": rounded(self.first_checkpoint_s), "checkpoints": len(self.commits_s)}


def temp_dirs(root: Path) -> set[str]:
    try:
        return {name for name in os.listdir(root) if name.startswith(TMP_PREFIX)}
    except FileNotFoundError:
        return set()


def _kill_due(plan: KillPlan, pace: Pace, since_spawn: float, life: Life, writing: set[str], writes: set[str]) -> bool:
    if plan.aim == WRITE:
        return bool(writing) and len(writes) > plan.writes_let_through
    if plan.aim == STARTUP and not plan.after_restore:
        return since_spawn >= plan.fraction * pace.startup_s
    if plan.aim == STARTUP:
        return life.ready_s is not None and since_spawn >= life.ready_s + plan.fraction * pace.interval_s
    return (len(life.commits_s) >= plan.commits_first
            and since_spawn >= life.commits_s[plan.commits_first - 1] + plan.fraction * pace.interval_s)


def supervise(command: list[str], log: Path, root: Path, services: Mapping[str, int | None],
              plan: KillPlan | None = None, pace: Pace | None = None) -> Life:
    """Run one daemon process; SIGKILL it as ``plan`` says (None: let it run to its end).
    ``services`` (name -> pid) must stay up meanwhile: a daemon without a broker would wait
    for it, not fail."""
    life = Life(plan, log)
    stale = temp_dirs(root)  # a killed predecessor's unfinished write, until this process's store removes it
    writes: set[str] = set()
    latest = read_latest(root)
    watch_log = plan is not None and plan.aim == STARTUP and plan.after_restore
    spawned = time.time()
    start = time.monotonic()
    services_checked = 0.0
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONHASHSEED": "0"})
    try:
        while proc.poll() is None:
            since_spawn = time.monotonic() - start
            if since_spawn > LIFE_TIMEOUT_S:
                raise RuntimeError(f"daemon still running after {LIFE_TIMEOUT_S:.0f} s:\n{_tail(log)}")
            if since_spawn - services_checked >= SERVICES_CHECK_S:
                services_checked = since_spawn
                if dead := exited(services):
                    raise RuntimeError(f"{', '.join(dead)} exited under a running daemon (killed from outside?)")
            if (seen := read_latest(root)) != latest:
                latest = seen
                life.commits_s.append(since_spawn)
            writing = temp_dirs(root) - stale
            writes |= writing
            if watch_log and life.ready_s is None and any(marker in log.read_bytes() for marker in READY):
                life.ready_s = since_spawn
            if plan is not None and pace is not None and _kill_due(plan, pace, since_spawn, life, writing, writes):
                proc.kill()
                proc.wait()
                life.killed_after_s = time.monotonic() - start
                # Mid-write only if the write never got renamed into place before the process died.
                life.landed = (WRITE if any((root / name).exists() for name in writing)
                               else BETWEEN if life.commits_s else STARTUP)
                break
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    life.exit_code = proc.returncode
    if life.landed is None and proc.returncode != 0:
        raise RuntimeError(f"daemon exited with {proc.returncode}:\n{_tail(log)}")
    resumed = log_time(log, "resumed from")
    life.resumed_s = None if resumed is None else resumed - spawned
    return life


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def exited(services: Mapping[str, int | None]) -> list[str]:
    """The services whose process is gone (a zombie too: dead, not yet reaped)."""
    dead = []
    for name, pid in services.items():
        try:  # /proc/<pid>/stat: "pid (comm) state ..."; comm may hold spaces and parentheses
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "gone"
        if pid is None or state in ("Z", "X", "gone"):
            dead.append(f"{name} (pid {pid})")
    return dead
