"""Chaos, short: the real daemon with the Redis cold tier on and tables small enough that rows
spill and come back, SIGKILLed four times (twice aimed at a checkpoint write, once right after
its restore, once between checkpoints), ends in the state of the uninterrupted run.

The long version is ``python -m bench.chaos`` (docs/benchmarks.md); this runs its code on the
session's broker and Redis, with a short log and a fixed list of kills. The failure it guards
against: Redis does not roll back with a checkpoint, so a killed process's spills and reads
after its last checkpoint stay there for the replay to find (the unversioned tier diverged).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import Sizes, prepare_world, run_configuration
from bench.kills import BETWEEN, STARTUP, WRITE, KillPlan
from bench.demo_setup import DemoSetup
from streamtrain.services import EmbeddedBroker, EmbeddedRedis

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KILLS = [
    KillPlan(WRITE),  # the first checkpoint this process writes
    KillPlan(STARTUP, after_restore=True, fraction=0.3),  # restored, training, nothing committed yet
    KillPlan(WRITE, writes_let_through=1),
    KillPlan(BETWEEN, commits_first=1, fraction=0.5),  # spills and cold reads since that commit are in Redis
]


def test_sigkilled_daemon_with_a_spilling_redis_cold_tier_ends_in_the_uninterrupted_state(
    broker: EmbeddedBroker, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    world = prepare_world(DemoSetup.load(broker, []), tmp_path, Sizes(exposures=7000, kills=len(KILLS)),
                          services={"broker": broker.pid, "redis": redis_server.pid})
    result = run_configuration(world, tmp_path / "redis_cold_tier", KILLS, redis_server.url)

    lives = result["lives"]
    assert result["kills"] == len(KILLS), lives
    assert result["kills_during_write"] >= 1, lives  # a write aimed at can finish first; two aims make a miss unlikely
    assert result["samples"] >= 7000 and result["read_whole_log"]  # every exposure (and correction) of the log
    assert result["identical"], (result["differences"][:40], result["first_divergence"])
    for table, counters in result["cold_tier"].items():  # item and user, capped below the world's ids
        assert counters["spills"] > 0 and counters["cold_hits"] > 0, (table, counters)
    assert result["cold_tier"] == result["reference_cold_tier"]
