"""The import direction of DESIGN.md §2 / STYLE.md §1, checked on the source of every module.

* Leaf packages (consumers, monitors, checkpoints) never import ``streamtrain``; monitors
  and checkpoints may use the sample contract of consumers, nothing else of each other.
* Building blocks inside ``streamtrain/`` never reach up into the wiring (trainer,
  runtime, distributed, cli); ``runtime`` and ``distributed`` (the single-process daemon
  and the scale-out ranks) are imported only by ``cli``, and never by each other;
  ``report`` sits below both (the runtime uses its file layout, the CLI draws with it).
* No import cycles between modules (lazy and ``TYPE_CHECKING`` imports included: a cycle
  hidden in a function is still a cycle of the design). A package's ``__init__``
  re-exporting its own modules is not an edge of the graph.
* No module reads another object's underscore attribute (``x._y`` with ``x`` not
  ``self``/``cls``), and nothing imports an underscore name from another module.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("streamtrain", "consumers", "monitors", "checkpoints")
LEAVES = ("consumers", "monitors", "checkpoints")
BLOCKS = ("simulator", "services", "embedding", "ops", "modules")
WIRING = ("streamtrain.trainer", "streamtrain.retrieval", "streamtrain.runtime", "streamtrain.distributed",
          "streamtrain.cli")
# Third-party names that start with an underscore but are their library's public surface
# (the rule is about our own objects), each with its reason.
UNDERSCORE_ALLOWED = {
    "_SubParsersAction": "argparse's type of add_subparsers(); annotations of the CLI's register() hooks",
    "_PARTITION_EOF": "confluent_kafka.KafkaError's documented code for end-of-partition events (librdkafka naming)",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _resolve(name: str) -> str | None:
    """The project module an import refers to (``a.b.C`` -> ``a.b`` if C is not a module)."""
    modules = _modules()
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> Iterator[tuple[str, ast.AST]]:
    """(imported project module, node) for every import in ``module``, relative ones resolved."""
    path = _modules()[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES and (resolved := _resolve(target)) is not None:
                yield resolved, node


def _edges(module: str) -> set[str]:
    """Modules ``module`` depends on; an ``__init__`` re-exporting its own subtree adds none."""
    is_package = _modules()[module].name == "__init__.py"
    return {t for t, _ in _imports(module)
            if t != module and not (is_package and t.startswith(module + "."))}


def _inside(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("leaf", LEAVES)
def test_leaf_packages_import_no_project_package_but_their_own(leaf: str) -> None:
    allowed = {leaf} | ({"consumers"} if leaf != "consumers" else set())  # the sample contract is shared
    for module in _modules():
        if _inside(module, leaf):
            for target in _edges(module):
                assert target.split(".")[0] in allowed, f"{module} imports {target}"


@pytest.mark.parametrize("block", BLOCKS)
def test_building_blocks_do_not_import_the_wiring(block: str) -> None:
    for module in _modules():
        if _inside(module, f"streamtrain.{block}"):
            for target in _edges(module):
                assert not _inside(target, *WIRING), f"{module} imports {target}"


@pytest.mark.parametrize("process", ["streamtrain.runtime", "streamtrain.distributed"])
def test_process_packages_are_imported_only_by_the_cli(process: str) -> None:
    for module in _modules():
        if _inside(module, process, "streamtrain.cli"):
            continue
        for target in _edges(module):
            assert not _inside(target, process), f"{module} imports {target}"


def test_the_report_reads_files_below_the_wiring() -> None:
    """streamtrain.report draws a run directory: it imports neither the runtime nor the CLI.
    The CLI imports it; outside the CLI only the runtime's history writer does, and only
    the module that owns the file layout (never the matplotlib part)."""
    for module in _modules():
        targets = {t for t in _edges(module) if _inside(t, "streamtrain.report")}
        if _inside(module, "streamtrain.report"):
            assert not any(_inside(t, "streamtrain.runtime", "streamtrain.cli") for t in _edges(module)), module
        elif targets and not _inside(module, "streamtrain.cli"):
            assert (module, targets) == ("streamtrain.runtime.timeseries", {"streamtrain.report.history"}), module


def test_top_level_modules_stay_below_the_wiring() -> None:
    """config and trainer are used by the runtime and the CLI, never the other way round."""
    for module in ("streamtrain.config", "streamtrain.config_docs", "streamtrain.trainer"):
        for target in _edges(module):
            assert not _inside(target, "streamtrain.runtime", "streamtrain.distributed", "streamtrain.cli"), \
                f"{module} imports {target}"


def test_no_import_cycles() -> None:
    graph = {m: _edges(m) for m in _modules()}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_reads_of_another_objects_private_attributes() -> None:
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                if node.attr not in UNDERSCORE_ALLOWED:
                    found.append(f"{module}:{node.lineno} .{node.attr}")
    assert not found, "private attributes read from outside their object:\n" + "\n".join(found)


def test_no_underscore_names_imported_from_other_modules() -> None:
    found = [f"{module}:{node.lineno} {alias.name}"
             for module in _modules() for _, node in _imports(module)
             if isinstance(node, ast.ImportFrom)
             for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert not found, "\n".join(sorted(set(found)))
