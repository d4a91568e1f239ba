"""consumers/ is a leaf package (STYLE §1): it imports third-party libraries and itself,
never the root (streamtrain) or its sibling leaves."""

from __future__ import annotations

import ast
from pathlib import Path

import consumers

FORBIDDEN = {"streamtrain", "monitors", "checkpoints"}


def test_consumers_imports_no_other_project_package() -> None:
    offenders = []
    for path in sorted(Path(consumers.__file__).parent.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in FORBIDDEN]
    assert offenders == []
