"""Crashes and disk failures at every instant of a save leave a loadable checkpoint.

Three levels: a scripted filesystem that dies or fails at operation *i* for every *i*;
real kernel write failures (RLIMIT_FSIZE works as root, unlike chmod); and a real process
that saves in a loop and is SIGKILLed at random moments, then proves exactly-once with the
sample ledger. Run as a script, this file is that process (see ``_child``).
"""

from __future__ import annotations

import errno
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_checkpoints import FakeClock, assert_same, make_components, save_step

from checkpoints import (
    CheckpointConfig,
    CheckpointInfo,
    CheckpointNotFoundError,
    CheckpointStore,
    CheckpointWriteError,
    checkpoint_name,
    ledger_chain,
    ledger_state,
)
from checkpoints.fsio import FileSystem

DAY = 86_400.0
# keep_last=2 and keep_daily=1 make the save under test also expire a daily pointer and
# delete a checkpoint, so every kind of operation is in the sequence.
CONFIG = CheckpointConfig(fsync=False, keep_last=2, keep_daily=1)


class ProcessDied(BaseException):
    """Raised by the scripted filesystem: the process is gone, nothing after it runs.

    A BaseException, so no ``except Exception`` / ``except OSError`` cleanup in the store
    gets to run — just as after a real SIGKILL.
    """


class ScriptedFS(FileSystem):
    """Records every mutating operation; raises ``error`` at operation number ``fail_at``."""

    def __init__(self, fail_at: int | None = None, error: BaseException | None = None) -> None:
        super().__init__(fsync=False)
        self.fail_at = fail_at
        self.error = error
        self.ops: list[str] = []

    def before(self, op: str, path: Path) -> None:
        self.ops.append(f"{op}:{path.name}")
        if len(self.ops) == self.fail_at:
            assert self.error is not None
            raise self.error


Outcome = tuple[str, dict[str, Any]]  # (checkpoint name, the components it must hold)
Action = Callable[[CheckpointStore], object]


def _new_step(store: CheckpointStore) -> object:
    return store.save(3, make_components(3), offsets={"events": {0: 3}}, watermark=None, config_hash="cfg")


def _same_step_new_content(store: CheckpointStore) -> object:
    return store.save(2, make_components(20), offsets={}, watermark=None, config_hash="cfg")


def _rollback(store: CheckpointStore) -> object:
    return store.rollback(checkpoint_name(1))


# name -> (action, outcome if it never happened, outcome if it completed)
SCENARIOS: dict[str, tuple[Action, Outcome, Outcome]] = {
    "new-step": (_new_step, (checkpoint_name(2), make_components(2)), (checkpoint_name(3), make_components(3))),
    "same-step": (
        _same_step_new_content,
        (checkpoint_name(2), make_components(2)),
        (checkpoint_name(2), make_components(20)),
    ),
    "rollback": (_rollback, (checkpoint_name(2), make_components(2)), (checkpoint_name(1), make_components(1))),
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints 1 and 2 saved yesterday (2 is LATEST, 1 is yesterday's daily pointer)."""
    root = tmp_path_factory.mktemp("prepared") / "ckpt"
    clock = FakeClock()
    with CheckpointStore(root, CONFIG, clock=clock) as store:
        save_step(store, 1)
        save_step(store, 2)
    return root


def _run(prepared: Path, root: Path, action: Action, fs: ScriptedFS) -> object:
    shutil.copytree(prepared, root)
    clock = FakeClock()
    clock.advance(DAY)
    with CheckpointStore(root, CONFIG, clock=clock, fs=fs) as store:
        return action(store)


def _assert_loads_one_of(root: Path, outcomes: tuple[Outcome, Outcome], where: str) -> int:
    """Open as the restarted daemon would: LATEST must name an intact checkpoint holding
    one of the two outcomes; returns which (0: before, 1: after)."""
    with CheckpointStore(root, CONFIG) as store:
        ckpt = store.load()
        assert ckpt.skipped == (), f"{where}: LATEST was not intact: {ckpt.skipped}"
        found = [i for i, (name, comps) in enumerate(outcomes) if name == ckpt.name and _same(ckpt.components, comps)]
        assert found, f"{where}: loaded {ckpt.name}, which is neither outcome"
        leftovers = [
            p.name for p in [*root.iterdir(), *root.glob("daily/*")] if p.name.startswith(".") and p.name != ".lock"
        ]
        assert leftovers == [], f"{where}: not cleaned on open: {leftovers}"
        return found[0]


def _same(a: Any, b: Any) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return False
    return True


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_crash_at_every_filesystem_operation(prepared: Path, tmp_path: Path, scenario: str) -> None:
    action, before, after = SCENARIOS[scenario]
    counting = ScriptedFS()
    _run(prepared, tmp_path / "count", action, counting)
    if scenario == "new-step":  # the sequence really contains every kind of operation
        kinds = {op.split(":")[0] for op in counting.ops}
        assert kinds == {
            "mkdir",
            "write_safetensors",
            "write_bytes",
            "fsync_dir",
            "rename",
            "remove_tree",
            "remove_file",
        }
    seen = set()
    for i in range(1, len(counting.ops) + 1):
        root = tmp_path / f"crash-{i}"
        with pytest.raises(ProcessDied):
            _run(prepared, root, action, ScriptedFS(i, ProcessDied()))
        seen.add(_assert_loads_one_of(root, (before, after), f"died before {counting.ops[i - 1]} (op {i})"))
    assert seen == {0, 1}  # crashes on both sides of the commit point


@pytest.mark.parametrize("scenario", ["new-step", "same-step"])
def test_disk_error_at_every_filesystem_operation(prepared: Path, tmp_path: Path, scenario: str) -> None:
    """ENOSPC / EACCES / EROFS anywhere: the save raises CheckpointWriteError with the errno,
    the temporary directory is gone and the previous checkpoint is intact; after the commit
    point the save succeeds with a warning instead."""
    action, before, after = SCENARIOS[scenario]
    counting = ScriptedFS()
    _run(prepared, tmp_path / "count", action, counting)
    codes = [errno.ENOSPC, errno.EACCES, errno.EROFS]
    for i in range(1, len(counting.ops) + 1):
        code = codes[i % len(codes)]
        root = tmp_path / f"fail-{i}"
        where = f"{os.strerror(code)} at {counting.ops[i - 1]} (op {i})"
        try:
            info = _run(prepared, root, action, ScriptedFS(i, OSError(code, os.strerror(code))))
        except CheckpointWriteError as exc:
            assert exc.errno == code, where
            left = [p.name for p in [*root.iterdir(), *root.glob("daily/*")] if p.name.startswith(".")]
            assert left == [".lock"], f"{where}: left behind {left}"
        else:
            assert isinstance(info, CheckpointInfo) and info.warnings, f"{where}: swallowed without a warning"
            assert (root / "LATEST").read_text().strip() == after[0], where
        _assert_loads_one_of(root, (before, after), where)


def test_real_write_failure_from_the_kernel(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes write(2) fail with EFBIG even for root: a real failing disk write."""
    with CheckpointStore(tmp_path / "ckpt", CONFIG) as store:
        save_step(store, 1)
        big = {"format_version": 1, "rows": torch.zeros(1 << 20)}  # 4 MiB > the 1 MiB limit
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
        try:
            with pytest.raises(CheckpointWriteError, match="saving ckpt-000000000002 failed") as info:
                store.save(2, {"big": big}, offsets={}, watermark=None, config_hash="c")
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)
        assert info.value.errno == errno.EFBIG
        assert sorted(os.listdir(store.root)) == [".lock", "LATEST", checkpoint_name(1), "daily"]
        ckpt = store.load()
        assert ckpt.name == checkpoint_name(1) and ckpt.skipped == ()


def test_disk_full_in_python_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with CheckpointStore(tmp_path / "ckpt", CONFIG) as store:
        save_step(store, 1)

        def full(fd: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(os, "write", full)
        with pytest.raises(CheckpointWriteError) as info:
            save_step(store, 2)
        monkeypatch.undo()
        assert info.value.errno == errno.ENOSPC
        assert not list(store.root.glob(".tmp-ckpt-*"))
        assert store.load().name == checkpoint_name(1)
        assert save_step(store, 2) == checkpoint_name(2)  # the daemon's retry works once space is back


def test_save_fsyncs_files_then_directories_in_commit_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = (tmp_path / "ckpt").resolve()  # compared with /proc/self/fd links, which are resolved
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}")).relative_to(root).as_posix()
        synced.append(re.sub(r"\.tmp-ckpt-1-\w+", "TMP", re.sub(r"^(.*)\.tmp-\w+$", r"\1.tmp", path)))
        real_fsync(fd)

    with CheckpointStore(root, CheckpointConfig(keep_daily=1), clock=FakeClock("2024-03-01T12:00:00")) as store:
        monkeypatch.setattr(os, "fsync", recording_fsync)
        save_step(store, 1)
    assert synced == [
        *(f"TMP/{f}" for f in ["dense.safetensors", "dense.json", "emb_item.safetensors", "emb_item.json"]),
        *(f"TMP/{f}" for f in ["joiner.json", "ledger.safetensors", "ledger.json", "MANIFEST.json"]),  # manifest last
        "TMP",  # the directory's entries, before it is renamed
        ".",  # the rename: ckpt-000000000001 now exists
        ".LATEST.tmp",
        ".",  # LATEST replaced: committed
        ".",  # daily/ created
        "daily/.2024-03-01.tmp",
        "daily",
    ]


# --------------------------------------------------------------- real SIGKILL

BATCH = 50  # samples per step in the child
KILLS = 6


def _child(root: Path) -> None:
    """Resume from the newest intact checkpoint, then 'train' and checkpoint every step.

    Training is deterministic: step s trains sample ids [(s-1)*BATCH, s*BATCH) and adds s to
    every weight, so a consistent checkpoint of step s has weights == s(s+1)/2 everywhere.
    """
    with CheckpointStore(root, CheckpointConfig(keep_last=10_000, keep_daily=0)) as store:
        try:
            ckpt = store.load()
            step, weights = ckpt.step, ckpt.components["model"]["weights"]
        except CheckpointNotFoundError:
            step, weights = 0, torch.zeros(512, 1024, dtype=torch.float64)  # 4 MiB
        print("ready", flush=True)
        while True:
            step += 1
            weights = weights + step
            store.save(
                step,
                {
                    "model": {"format_version": 1, "weights": weights},
                    "ledger": ledger_state(np.arange((step - 1) * BATCH, step * BATCH)),
                },
                offsets={"events": {0: step * BATCH}},
                watermark=step,
                config_hash="sigkill-test",
            )


@pytest.mark.slow
def test_sigkill_at_random_moments_then_exactly_once(tmp_path: Path) -> None:
    root = tmp_path / "ckpt"
    rng = random.Random(1234)
    mid_save = 0
    for kill in range(KILLS):
        with open(tmp_path / f"child-{kill}.err", "w") as err:
            child = subprocess.Popen(
                [sys.executable, __file__, str(root)], stdout=subprocess.PIPE, stderr=err, text=True
            )
            assert child.stdout is not None
            try:
                assert child.stdout.readline() == "ready\n", (tmp_path / f"child-{kill}.err").read_text()
                # The first child's first save (4 MiB, fsynced) can outlast any fixed delay on a
                # slow disk; the checks below need a checkpoint to fall back to.
                deadline = time.monotonic() + 120
                while not (root / "LATEST").exists():
                    assert time.monotonic() < deadline and child.poll() is None, \
                        (tmp_path / f"child-{kill}.err").read_text()
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.05, 0.6))  # a random moment, most likely mid-save
                assert child.poll() is None, (tmp_path / f"child-{kill}.err").read_text()
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait()
                child.stdout.close()
        mid_save += any(root.glob(".tmp-ckpt-*"))
        with CheckpointStore(root, CheckpointConfig(keep_last=10_000, keep_daily=0)) as store:
            ckpt = store.load()  # after cleaning what the kill left behind
            step = ckpt.step
            assert ckpt.skipped == ()
            assert torch.all(ckpt.components["model"]["weights"] == step * (step + 1) / 2)
            assert ckpt.offsets == {"events": {0: step * BATCH}}
        chain = ledger_chain(root)
        assert chain.truncated_at is None and [link.step for link in chain.links] == list(range(1, step + 1))
        np.testing.assert_array_equal(chain.sample_ids(), np.arange(step * BATCH))  # each sample once
    print(f"{KILLS} kills, {mid_save} mid-save, reached step {step}")


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
