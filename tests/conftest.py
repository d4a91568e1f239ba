"""Suite-wide fixtures: one embedded broker and one Redis server per session (per xdist
worker when ``scripts/test.sh`` runs the files on several), and the order of the files.

Tests get isolation through unique topic / group names (``unique_name``) and Redis key
prefixes, not through separate servers.
"""

from __future__ import annotations

import itertools
import os
import socket
import sys
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings

from streamtrain.services import EmbeddedBroker, EmbeddedRedis

# No per-example deadline anywhere: hypothesis' default (200 ms) measures the machine, not
# the code, and a loaded 2-core CI box stalls a process for longer than that (GC,
# preemption, a cold import), which hypothesis reports as DeadlineExceeded or Flaky.
settings.register_profile("streamtrain", deadline=None)
settings.load_profile("streamtrain")

_counter = itertools.count()

# The slowest files (60-270 s each on a loaded 2-core box, `--durations`), run first:
# scripts/test.sh hands whole files to its workers in collection order, and a long file
# left to the end would run alone while the other worker has nothing to do.
RUN_FIRST = ("test_drift_scenarios.py", "test_scaleout.py", "test_daemon_recovery.py", "test_daemon_redis.py",
             "test_daemon_overload.py", "test_stats_worker.py", "test_checkpoints_faults.py", "test_chaos.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slowest files first, in RUN_FIRST's order; the rest keep theirs (the sort is stable)."""
    rank = {name: i for i, name in enumerate(RUN_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(RUN_FIRST)))


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_dir=tmp_path_factory.mktemp("broker-logs")) as b:
        yield b


@pytest.fixture(scope="session")
def kafka_bootstrap(broker: EmbeddedBroker) -> str:
    return broker.bootstrap_servers


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(log_dir=tmp_path_factory.mktemp("redis-logs")) as r:
        yield r


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def unique_name(request: pytest.FixtureRequest) -> str:
    """A topic/group/key-prefix name unique to this test in this session."""
    base = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:60]
    return f"t{next(_counter)}-{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test. Bound but never
    listening: unlike a probe socket closed before use, no other process can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


@pytest.fixture(autouse=True)
def _torch_process_settings_restored() -> Iterator[None]:
    """An in-process ``Daemon`` sets torch's thread count and deterministic mode for the
    whole process (streamtrain/daemon.py): put them back, or every later test would run
    with them and its numbers would depend on which tests ran before it."""
    torch = sys.modules.get("torch")  # every test module that trains imports it at collection
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture(autouse=True)
def _no_env_leak(monkeypatch: pytest.MonkeyPatch) -> None:
    """Config must not pick up a developer's STREAMTRAIN_* variables during tests."""
    for key in list(os.environ):
        if key.startswith("STREAMTRAIN_") and key != "STREAMTRAIN_CACHE":
            monkeypatch.delenv(key)
