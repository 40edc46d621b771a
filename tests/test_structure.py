"""The package's shape: modules import in one direction (no cycle, lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "retrolm"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere (functions included), except under
    `if TYPE_CHECKING:`."""

    def owner(name: str) -> str | None:  # the module that defines `name` (or is it)
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {
            id(sub)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for sub in ast.walk(node)
        }
        deps: set[str | None] = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                deps |= {owner(a.name) for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:
                    package = (
                        name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    )
                    base = ".".join(package[: len(package) - node.level + 1] + [node.module])
                deps |= {owner(f"{base}.{a.name}") for a in node.names}
        graph[name] = {d for d in deps if d is not None and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_lazy_imports(tmp_path):
    modules = {"pkg.x": tmp_path / "x.py", "pkg.y": tmp_path / "y.py"}
    modules["pkg.x"].write_text("def f():\n    from pkg.y import g\n")
    modules["pkg.y"].write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.x import f\n"
    )
    assert import_graph(modules) == {"pkg.x": {"pkg.y"}, "pkg.y": set()}


def test_no_import_cycle_in_the_package():
    graph = import_graph(module_files())
    assert "retrolm.model" in graph and "retrolm.weights" in graph["retrolm.model"]
    assert cycles(graph) == []


def test_the_manifest_is_read_through_its_class_only():
    """The database manifest is a typed `Manifest` owned by `database/manifest.py`: no other
    module indexes it as a dict."""
    owner = PACKAGE / "database" / "manifest.py"
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{n}"
        for path in PACKAGE.rglob("*.py")
        if path != owner
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if 'manifest["' in line or "manifest['" in line
    ]
    assert found == []


def test_every_content_setting_names_the_build_stage_it_decides():
    from dataclasses import fields

    from retrolm.database.config import CONTENT_FIELDS, CONTENT_STAGE, DatabaseConfig
    from retrolm.database.manifest import STAGES

    assert set(CONTENT_STAGE.values()) <= set(STAGES)
    assert set(CONTENT_FIELDS) <= {f.name for f in fields(DatabaseConfig)}
    assert DatabaseConfig().content_settings().keys() == CONTENT_STAGE.keys()
