"""The import direction of DESIGN.md §2 / STYLE.md §1, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LEAVES = ("consumers", "monitors", "checkpoints")
FORBIDDEN_FOR_LEAVES = {"streamtrain", *LEAVES}
# Building blocks inside streamtrain/ must not reach up into the wiring.
WIRING = {"streamtrain.daemon", "streamtrain.trainer", "streamtrain.cli"}
BLOCKS = ("simulator", "services", "embedding", "ops", "modules")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_packages_import_no_project_package_but_their_own(leaf: str) -> None:
    allowed = {leaf} | ({"consumers"} if leaf != "consumers" else set())  # the sample contract is shared
    for path in (REPO / leaf).rglob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN_FOR_LEAVES and top not in allowed:
                pytest.fail(f"{path.relative_to(REPO)} imports {name}")


@pytest.mark.parametrize("block", BLOCKS)
def test_building_blocks_do_not_import_the_wiring(block: str) -> None:
    for path in (REPO / "streamtrain" / block).rglob("*.py"):
        for name in _imports(path):
            if any(name == w or name.startswith(w + ".") for w in WIRING):
                pytest.fail(f"{path.relative_to(REPO)} imports {name}")
