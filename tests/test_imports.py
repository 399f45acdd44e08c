"""Import hygiene of src/adalog: every module imports on its own, and the module graph is acyclic.

A cycle works or breaks depending on which module is imported first (and on lazy imports
running late), so it is checked statically from the AST, function-level imports included.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from collections import deque
from pathlib import Path

import pytest

PACKAGE = "adalog"


def _package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)  # locates the package without executing it
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def module_files(package_dir: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file of the package."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = [package, *path.relative_to(package_dir).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, from every ``import``/``from`` statement
    anywhere in its AST (inside functions too). ``from X import y`` points at ``X.y`` when that
    is a module, else at ``X``. Parent packages a dotted import executes implicitly are not
    edges: with them, any ``__init__`` that re-exports a submodule would form a "cycle"."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        deps.add(f"{target}.{alias.name}")
                    elif target in modules:
                        deps.add(target)
        deps.discard(name)
        graph[name] = deps
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components with more than one module (each one holds at least one cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
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


def shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str]:
    """The shortest import path from ``start`` back to itself (``[start, ..., start]``)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node]):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    return []


def describe_cycles(graph: dict[str, set[str]]) -> str:
    """One line per component: a shortest cycle, then every edge inside the component (the
    edges to cut from)."""
    lines = []
    for component in strongly_connected(graph):
        members = set(component)
        lines.append("cycle: " + " -> ".join(shortest_cycle(graph, component[0])))
        lines += [f"    {a} -> {b}" for a in component for b in sorted(graph[a] & members)]
    return "\n".join(lines)


def test_import_graph_finds_lazy_and_relative_cycles(tmp_path: Path):
    """The detector itself: a cycle closed by a function-level relative import is found, and a
    package ``__init__`` re-exporting its submodules is not a cycle."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from pkg.a import f\n",
        "a.py": "from .sub import b\ndef f():\n    return b\n",
        "sub/__init__.py": "",
        "sub/b.py": "import pkg.sub.c\n",
        "sub/c.py": "def g():\n    from ..a import f\n    from . import d\n    return f\n",
        "sub/d.py": "from pkg import a as unused\nfrom pkg.sub import c\nimport os\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(module_files(pkg, "pkg"))
    assert graph == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.sub.b"},
        "pkg.sub": set(),
        "pkg.sub.b": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.a", "pkg.sub.d"},
        "pkg.sub.d": {"pkg.a", "pkg.sub.c"},
    }
    assert strongly_connected(graph) == [["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.sub.d"]]
    assert shortest_cycle(graph, "pkg.a") == ["pkg.a", "pkg.sub.b", "pkg.sub.c", "pkg.a"]
    assert shortest_cycle(graph, "pkg.sub.d") == ["pkg.sub.d", "pkg.sub.c", "pkg.sub.d"]
    assert shortest_cycle(graph, "pkg") == []
    assert "    pkg.sub.c -> pkg.a" in describe_cycles(graph)


def test_adalog_import_graph_has_no_cycles():
    modules = module_files(_package_dir())
    assert {"adalog.runtime.fast", "adalog.runtime.integer", "adalog.cli"} <= set(modules)
    graph = import_graph(modules)
    assert "adalog.runtime.integer" in graph["adalog.runtime.fast"]  # the graph sees imports
    report = describe_cycles(graph)
    assert not report, f"import cycles in src/adalog:\n{report}"


def test_runtime_modules_are_in_no_cycle():
    """The engines' layering (kernels, artifact < integer < fast < builder < onnx_engine) on its
    own, so that it stays checked while a cycle elsewhere in the package is being fixed."""
    graph = import_graph(module_files(_package_dir()))
    cyclic = {module for component in strongly_connected(graph) for module in component}
    assert not {m for m in cyclic if m.startswith("adalog.runtime")}, describe_cycles(graph)
    assert "adalog.runtime.fast" not in graph["adalog.runtime.integer"]


_IMPORT_EACH = """
import importlib, json, sys, traceback
failures = {}
for name in sys.argv[1:]:
    for key in [k for k in sys.modules if k == "adalog" or k.startswith("adalog.")]:
        del sys.modules[key]
    try:
        importlib.import_module(name)
    except BaseException:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


@pytest.mark.slow
def test_every_module_imports_first():
    """Each module imported first in a clean ``adalog`` namespace (one subprocess; torch and
    timm stay loaded between modules): an import that only works after some other module was
    imported would fail here."""
    names = sorted(module_files(_package_dir()))
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, *names],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{tb}" for name, tb in failures.items())
