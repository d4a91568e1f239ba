"""ReleaseManager: the gate is the only way to publish; cadence; shadow check; rollback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model_fixtures import SyntheticWorld
from monitors.config import GateConfig
from monitors.gate import Gate
from streamtrain.config import PublishingConfig
from streamtrain.embedding import EmbeddingTableConfig
from streamtrain.modules.config import ModelConfig
from streamtrain.runtime.publisher import Publisher
from streamtrain.runtime.releases import ReleaseManager
from streamtrain.trainer import Predictions, Trainer


def _trainer() -> Trainer:
    model = ModelConfig(embedding_dim=8, max_history_len=8, hstu={"num_layers": 1, "qk_dim": 4, "v_dim": 4},
                        esmm={"hidden": (8,)}, retrieval={"dim": 8})
    tables = {n: EmbeddingTableConfig(name=n, dim=8, initial_rows=256, admission={"min_count": 1, "sketch_width": 256})
              for n in ("item", "user", "sparse")}
    return Trainer(model, tables, learning_rate=1e-3, seed=0, device=torch.device("cpu"))


class _Oracle:
    """A stand-in CURRENT version that scores every batch perfectly."""

    def predict(self, batch: dict[str, np.ndarray]) -> Predictions:
        return Predictions(np.clip(batch["click"], 0.01, 0.99), np.clip(batch["convert"], 0.01, 0.99))


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def batches() -> list[dict[str, np.ndarray]]:
    world, rng = SyntheticWorld(), np.random.default_rng(0)
    return [world.batch(rng, 64, history=8, negatives=2) for _ in range(8)]


def _step(manager: ReleaseManager, trainer: Trainer, gate: Gate, batch: dict[str, np.ndarray]) -> str | None:
    """One daemon step as far as releases go; the checkpoint name stands for the step's."""
    result = trainer.step(batch)
    manager.observe(batch, result.predictions)
    manager.account(len(batch["sample_id"]), gate, trainer.samples)
    if not manager.decide(gate):
        return None
    version = manager.publish_pending(trainer, f"ckpt-{trainer.steps:012d}", {})
    return None if version is None else version.name


def _run(manager: ReleaseManager, trainer: Trainer, gate: Gate, batches: list[dict[str, np.ndarray]]) -> list[str]:
    return [name for batch in batches if (name := _step(manager, trainer, gate, batch)) is not None]


def test_nothing_is_published_while_frozen(tmp_path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    trainer, gate = _trainer(), Gate(GateConfig())
    manager = ReleaseManager(PublishingConfig(every_samples=128, shadow_window=0), Publisher(tmp_path))
    gate.freeze("test")
    assert _run(manager, trainer, gate, batches[:4]) == []
    gate.unfreeze("test")
    assert _run(manager, trainer, gate, batches[4:]) == ["v000001", "v000002"]
    files = {p.name for p in (tmp_path / "v000001").iterdir()}
    assert {"dense.safetensors", "embedding-item.parquet", "items.faiss", "MANIFEST.json"} <= files


def test_wall_clock_cadence(tmp_path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    clock, trainer, gate = _Clock(), _trainer(), Gate(GateConfig())
    manager = ReleaseManager(PublishingConfig(every_samples=10**9, every_seconds=60, shadow_window=0),
                             Publisher(tmp_path), clock=clock)
    assert _run(manager, trainer, gate, batches[:2]) == []
    clock.now = 61
    assert _run(manager, trainer, gate, batches[2:3]) == ["v000001"]


def test_shadow_check_holds_a_candidate_worse_than_current(tmp_path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    trainer, gate = _trainer(), Gate(GateConfig())
    manager = ReleaseManager(PublishingConfig(every_samples=128, shadow_window=128, shadow_tolerance=0.01),
                             Publisher(tmp_path), shadow_of=lambda t: _Oracle())
    assert _run(manager, trainer, gate, batches[:2]) == ["v000001"]  # no CURRENT yet: nothing to compare
    assert _run(manager, trainer, gate, batches[2:]) == []  # an untrained model never beats a perfect CURRENT
    assert manager.held == 3


def test_rollback_on_freeze_picks_a_version_released_before_the_margin(
    tmp_path: Path, batches: list[dict[str, np.ndarray]]
) -> None:
    trainer = _trainer()
    gate = Gate(GateConfig(on_freeze="rollback"))
    publisher = Publisher(tmp_path)
    manager = ReleaseManager(PublishingConfig(every_samples=64, shadow_window=0, rollback_margin_samples=128),
                             publisher)
    assert _run(manager, trainer, gate, batches[:5]) == [f"v00000{i}" for i in range(1, 6)]
    gate.freeze("drift")  # manual freeze with the rollback action requests a rollback
    _run(manager, trainer, gate, batches[5:6])
    # 384 samples trained at the freeze step; margin 128 -> newest version with samples <= 256
    assert publisher.current().name == "v000004"
    assert manager.rollbacks == 1 and not gate.rollback_requested


def test_a_version_names_the_checkpoint_of_its_step_and_a_replay_does_not_publish_it_again(
    tmp_path: Path, batches: list[dict[str, np.ndarray]]
) -> None:
    publisher = Publisher(tmp_path)
    config = PublishingConfig(every_samples=128, shadow_window=0)
    trainer, gate = _trainer(), Gate(GateConfig())
    first = ReleaseManager(config, publisher)
    assert _run(first, trainer, gate, batches[:2]) == ["v000001"]
    assert publisher.version("v000001").manifest["checkpoint"] == "ckpt-000000000002"
    # A crash right after that release: the replay from the step before re-decides it.
    replay_trainer = _trainer()
    replay = ReleaseManager(config, publisher)
    assert _run(replay, replay_trainer, gate, batches[:2]) == ["v000001"], "the same version, not a v000002"
    assert [v.name for v in publisher.versions()] == ["v000001"] and replay.released == 1


def test_restored_state_replays_the_shadow_check_exactly(tmp_path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    """The shadow window and the shadow's version are state: a manager restored mid-window
    (its shadow rebuilt from the published files) decides exactly like the uninterrupted one."""
    config = PublishingConfig(every_samples=128, shadow_window=128, shadow_tolerance=0.0)

    def run(restart_at: int | None, root: Path) -> list[dict[str, object]]:
        publisher, gate, trainer = Publisher(root), Gate(GateConfig()), _trainer()
        manager = ReleaseManager(config, publisher)
        for i, batch in enumerate(batches):
            if i == restart_at:
                state, trainer_state = manager.state_dict(), trainer.state_dict()
                trainer = _trainer()
                trainer.load_state_dict(trainer_state)
                manager = ReleaseManager(config, publisher)
                manager.load_state_dict(state, trainer)
            _step(manager, trainer, gate, batch)
        return [manager.state_dict()]

    uninterrupted = run(None, tmp_path / "a")
    for restart_at in (3, 5):  # inside a shadow window, and right after a release
        restored = run(restart_at, tmp_path / f"r{restart_at}")
        a, b = uninterrupted[0], restored[0]
        assert {k: v for k, v in a.items() if k != "window"} == {k: v for k, v in b.items() if k != "window"}
        for key in ("candidate", "current", "labels"):
            assert np.array_equal(a["window"][key], b["window"][key])  # type: ignore[index]
