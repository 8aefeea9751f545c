"""The layout promise: no library module imports the CLI, and no two modules import each other.

Imports are read from the source (ast), function-level ones included: a lazy import is
still a dependency, and a cycle through one is still a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import condiff

ROOT = Path(condiff.__file__).parent
CLI = {"condiff.cli", "condiff.cli_eval", "condiff.cli_family", "condiff.similarity.commands", "condiff.__main__"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """condiff module -> the condiff modules it imports (anywhere in its source)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = package.split(".")
                    pkg = pkg[:len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in modules:  # condiff.x.y.Name -> the module condiff.x.y
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "condiff.guidance" in graph["condiff.compose"]  # module level, relative
    assert "condiff.pipeline" in graph["condiff.distributed"]  # inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_library_module_imports_the_cli():
    graph = import_graph()
    bad = sorted(f"{m} -> {d}" for m, deps in graph.items() if m not in CLI and m != "condiff"
                 for d in deps & CLI)
    assert not bad, bad


def test_no_import_cycles():
    graph = import_graph()
    # condiff/__init__ re-exports submodules; a package importing its own children is not a cycle
    for pkg in ("condiff", "condiff.similarity", "condiff.nets"):
        for child in [m for m in graph if m.startswith(pkg + ".")]:
            graph[child].discard(pkg)
    assert cycles(graph) == []
