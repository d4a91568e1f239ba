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
from streamtrain.publisher import Publisher
from streamtrain.releases import ReleaseManager
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


def _run(manager: ReleaseManager, trainer: Trainer, gate: Gate, batches: list[dict[str, np.ndarray]]) -> list[str]:
    released = []
    for batch in batches:
        trainer.step(batch, manager.observe)
        version = manager.after_step(trainer, gate, len(batch["sample_id"]), lambda: {"checkpoint": None})
        if version is not None:
            released.append(version.name)
    return released


def test_nothing_is_published_while_frozen(tmp_path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    trainer, gate = _trainer(), Gate(GateConfig())
    manager = ReleaseManager(PublishingConfig(every_samples=128, shadow_window=0), Publisher(tmp_path), lambda t: t)
    gate.freeze("test")
    assert _run(manager, trainer, gate, batches[:4]) == []
    gate.unfreeze("test")
    assert _run(manager, trainer, gate, batches[4:]) == ["v000001", "v000002"]
    files = {p.name for p in (tmp_path / "v000001").iterdir()}
    assert {"dense.safetensors", "embedding-item.parquet", "items.faiss", "MANIFEST.json"} <= files


def test_wall_clock_cadence(tmp_path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    clock, trainer, gate = _Clock(), _trainer(), Gate(GateConfig())
    manager = ReleaseManager(PublishingConfig(every_samples=10**9, every_seconds=60, shadow_window=0),
                             Publisher(tmp_path), lambda t: t, clock=clock)
    assert _run(manager, trainer, gate, batches[:2]) == []
    clock.now = 61
    assert _run(manager, trainer, gate, batches[2:3]) == ["v000001"]


def test_shadow_check_holds_a_candidate_worse_than_current(tmp_path: Path, batches: list[dict[str, np.ndarray]]) -> None:
    trainer, gate = _trainer(), Gate(GateConfig())
    manager = ReleaseManager(PublishingConfig(every_samples=128, shadow_window=128, shadow_tolerance=0.01),
                             Publisher(tmp_path), lambda t: _Oracle())  # type: ignore[arg-type, return-value]
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
                             publisher, lambda t: t)
    assert _run(manager, trainer, gate, batches[:5]) == [f"v00000{i}" for i in range(1, 6)]
    gate.freeze("drift")  # manual freeze with the rollback action requests a rollback
    _run(manager, trainer, gate, batches[5:6])
    # 384 samples trained at the freeze step; margin 128 -> newest version with samples <= 256
    assert publisher.current().name == "v000004"
    assert manager.rollbacks == 1 and not gate.rollback_requested
