"""The nn.Module face: shapes, bag pooling, and the embedding package's import boundary."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from streamtrain.embedding import EmbeddingTableConfig
from streamtrain.modules.dynamic_embedding import DynamicEmbedding, DynamicEmbeddingBag, hash_bucket

CFG = EmbeddingTableConfig(dim=5, initial_rows=8, admission={"min_count": 1}, optimizer={"kind": "sgd", "lr": 0.5})


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 4)])
def test_output_shape_is_ids_shape_plus_dim(shape: tuple[int, ...]) -> None:
    module = DynamicEmbedding(CFG)
    ids = torch.randint(0, 6, shape)
    out = module(ids)
    assert out.shape == (*shape, 5)
    flat = module(ids.reshape(-1)).view(*shape, 5)
    assert torch.equal(out, flat)
    module.apply_gradients()


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bag_pools_the_last_dim_and_skips_padding(mode: str) -> None:
    bag, seq = DynamicEmbeddingBag(CFG, mode=mode), DynamicEmbedding(CFG)
    ids = torch.tensor([[4, 0, 9, 4], [0, 0, 0, 0], [7, 0, 0, 0]])  # (B, L), 0 = padding
    pooled, rows = bag(ids), seq(ids)  # same seed: same initial rows
    expected = rows.sum(1)
    if mode == "mean":
        expected = expected / torch.tensor([[3.0], [1.0], [1.0]])
    torch.testing.assert_close(pooled, expected)
    assert not pooled[1].any()
    pooled.sum().backward()
    bag.apply_gradients()
    bag.eval()
    assert not torch.equal(bag(ids), pooled.detach()), "the pooled rows were trained"


def test_gradients_flow_only_after_apply() -> None:
    module = DynamicEmbedding(CFG)
    ids = torch.tensor([1, 2, 2])
    module(ids).sum().backward()
    module.eval()
    before = module(ids)
    module.train()
    module.apply_gradients()
    module.eval()
    after = module(ids)
    # Row 2 appears twice: its summed gradient is 2, so it moves twice as far as row 1.
    torch.testing.assert_close(before - after, torch.tensor([[0.5] * 5, [1.0] * 5, [1.0] * 5]))


def test_embedding_package_imports_only_itself_and_third_parties() -> None:
    package = Path(__file__).resolve().parents[1] / "streamtrain" / "embedding"
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in {"consumers", "monitors", "checkpoints"}, f"{source.name} imports {name}"
                if top == "streamtrain":
                    assert name.startswith("streamtrain.embedding"), f"{source.name} imports {name}"


def test_hash_buckets_make_a_fixed_table_whose_colliding_ids_share_a_row() -> None:
    ids = torch.arange(0, 41)  # 0 is padding
    buckets = hash_bucket(ids, 4)
    assert buckets[0] == 0 and set(buckets[1:].tolist()) == {1, 2, 3, 4}
    hashed = DynamicEmbedding(CFG.model_copy(update={"hash_buckets": 4}))
    out = hashed(ids)
    assert hashed.table.size == 4 and not out[0].any()
    for a, b in ((1, j) for j in range(2, 41)):  # same bucket <=> same row
        assert torch.equal(out[a], out[b]) == bool(buckets[a] == buckets[b]), (a, b)
    dynamic = DynamicEmbedding(CFG.model_copy(update={"initial_rows": 64}))
    dynamic(ids)
    assert dynamic.table.size == 40  # one row per id
