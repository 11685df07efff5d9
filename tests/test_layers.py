"""The layer contract: `lint-imports` keeps every contract in pyproject.toml, and the import
graph of src/fgcli has no cycle, imports inside functions included.

The graph is read from the source (an ast walk, nothing imported): ``import a.b`` is an edge
to ``a.b``; ``from a.b import c`` is an edge to ``a.b`` (its ``__init__`` runs first) and to
``a.b.c`` when that is a module. So a submodule that imports names or submodules through its
own package's ``__init__`` makes a cycle exactly when that ``__init__`` imports it back.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest
from helpers import ROOT

SRC = ROOT / "src"
PACKAGE = "fgcli"

Edges = dict[str, dict[str, str]]  # module -> {imported module: "file:line" of the import}


def test_lint_imports_keeps_every_contract():
    if importlib.util.find_spec("importlinter") is None:
        pytest.skip("import-linter is not installed: pip install -e '.[test]'")
    exe = Path(sys.executable).with_name("lint-imports")
    command = [str(exe)] if exe.exists() else [sys.executable, "-m", "importlinter.cli"]
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    result = subprocess.run([*command, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                            check=False, env={**os.environ, "PYTHONPATH": path}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout, result.stdout


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Every module under ``root/PACKAGE``: dotted name -> (file, is a package)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _targets(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The modules one import statement names (see the module docstring)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(root: Path = SRC) -> Edges:
    """Module -> the modules of the package it imports, anywhere in its file."""
    modules = _modules(root)
    graph: Edges = {name: {} for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(node, package):
                if target in modules and target != name:
                    where = f"{path.relative_to(root)}:{node.lineno}"
                    graph[name].setdefault(target, where)
    return graph


def _components(graph: Edges) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def _cycle(graph: Edges, component: list[str]) -> str:
    """One shortest cycle through the component's first module, each import with its line."""
    start, members = component[0], set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                path.reverse()
                hops = [f"{a} -> {b} ({graph[a][b]})" for a, b in zip(path, [*path[1:], start])]
                return "\n  ".join(hops)
            if child in members and child not in came_from and child != start:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start}")  # a component always has one


def _cycles(graph: Edges) -> list[str]:
    return [_cycle(graph, component) for component in _components(graph)]


def test_no_import_cycle():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles in src/fgcli:\n  " + "\n\n  ".join(cycles)


def test_the_cycle_finder_sees_a_cycle_through_a_package_init(tmp_path):
    """The rule itself: a submodule importing through its package's ``__init__`` that
    imports it back is a cycle; a plain package import, or a sibling import, is not."""
    pkg = tmp_path / PACKAGE / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / PACKAGE / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from fgcli.sub.a import A\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\nA = 1\n")
    (pkg / "b.py").write_text("import fgcli.sub.c\n")
    (pkg / "c.py").write_text("X = 1\n")
    graph = import_graph(tmp_path)
    assert _cycles(graph) == [("fgcli.sub -> fgcli.sub.a (fgcli/sub/__init__.py:1)\n"
                               "  fgcli.sub.a -> fgcli.sub (fgcli/sub/a.py:2)")]
    (pkg / "a.py").write_text("import fgcli.sub.b\nA = 1\n")
    assert _cycles(import_graph(tmp_path)) == []
