"""The package's modules import one another one way: no cycle, the layers in order.

Reads the source of ``pgflow/*.py`` with :mod:`ast` (nothing is imported) and
takes every import statement, wherever it stands: at module level, inside a
function (a deferred import is still a dependency) and under ``TYPE_CHECKING``.
No database needed.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pgflow"

# Lower layers never import higher ones (see the graph at the top of pgflow/replay.py).
DATABASE_LAYER = ("pgflow.procedures", "pgflow.reporter", "pgflow.connections", "pgflow.schema")
ENGINE = ("pgflow.replay", "pgflow.steps")
PUBLIC_SURFACE = ("pgflow.context", "pgflow.saga")
SHARED_TYPES = ("pgflow.journal", "pgflow.validation", "pgflow.errors")


def _modules() -> dict[str, Path]:
    found = {"pgflow": PACKAGE / "__init__.py"}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name != "__init__.py":
            found[f"pgflow.{path.stem}"] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, module: str, modules: dict[str, Path]) -> set[str]:
    """The ``pgflow`` modules an import statement of ``module`` depends on."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return {name for name in names if name in modules}
    base = node.module or ""
    if node.level:  # relative: from . import x, from .x import y
        package = module if module == "pgflow" else module.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    if base not in modules:
        return set()
    found = set()
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        # `from pgflow import codec` depends on pgflow.codec, not on the package.
        found.add(submodule if submodule in modules else base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= _imported(node, module, modules)
        edges.discard(module)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph()
    found = cycles(graph)
    described = [f"{module} -> {', '.join(sorted(graph[module] & set(component)))}"
                 for component in found for module in component]
    assert not found, "import cycles among pgflow modules:\n" + "\n".join(described)


def test_the_engine_and_the_database_layer_do_not_import_the_layers_above_them() -> None:
    graph = import_graph()
    upward = []
    for low, high in ((DATABASE_LAYER, ENGINE + PUBLIC_SURFACE), (ENGINE, PUBLIC_SURFACE),
                      (SHARED_TYPES, DATABASE_LAYER + ENGINE + PUBLIC_SURFACE)):
        upward += [f"{module} imports {target}" for module in low
                   for target in sorted(graph.get(module, ())) if target in high]
    assert not upward, "\n".join(upward)


def test_the_graph_reads_every_kind_of_import() -> None:
    """Deferred and relative imports count, and a name from a module is that module."""
    modules = {name: Path() for name in ("pgflow", "pgflow.a", "pgflow.b", "pgflow.c")}
    source = ("from pgflow import b\n"
              "def f():\n    from .c import thing\n"
              "import pgflow.b\nfrom pgflow import __version__\nimport os\n")
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found |= _imported(node, "pgflow.a", modules)
    assert found == {"pgflow", "pgflow.b", "pgflow.c"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
