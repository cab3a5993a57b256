"""Structural checks of the library, read from the source with ``ast``.

* no import cycles among ``natgrad`` modules, counting imports under ``TYPE_CHECKING``
  and resolving relative imports;
* no class body longer than :data:`MAX_CLASS_LINES` lines.

Run as a script (``python tests/test_architecture.py``) to print the import cycles and
the longest classes.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "natgrad"
MAX_CLASS_LINES = 250


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def import_graph() -> dict[str, set[str]]:
    """Module → the natgrad modules it imports (anywhere in the file, TYPE_CHECKING too).

    ``from .pkg import name`` counts as an import of ``pkg.name`` when that is a module,
    else of ``pkg`` (its ``__init__``).
    """
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                if target in modules and target != module:
                    graph[module].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package_init(module: str, graph: dict[str, set[str]]) -> bool:
    return any(other.startswith(module + ".") for other in graph)


def class_lengths(exclude: tuple[str, ...] = ()) -> list[tuple[int, str]]:
    """``(lines, "module.Class")`` of every class in the library, longest first."""
    out = []
    for module, path in _modules().items():
        if any(module == e or module.startswith(e + ".") for e in exclude):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                out.append((node.end_lineno - node.lineno + 1, f"{module}.{node.name}"))
    return sorted(out, reverse=True)


def test_no_import_cycles():
    graph = import_graph()
    # A package's __init__ re-exports its submodules; a submodule importing a sibling
    # through the package is an edge to __init__, which is not a cycle by itself.
    cycles = import_cycles(graph)
    assert not cycles, "import cycles in src/natgrad:\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_import_graph_sees_relative_and_type_checking_imports(tmp_path):
    """The checker itself: a cycle closed only by a TYPE_CHECKING import is found."""
    graph = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": set()}
    assert import_cycles(graph) == [["p.a", "p.b"]]
    assert "natgrad.layers" in import_graph()["natgrad.capture"]


def test_no_class_over_250_lines():
    # The benchmark tool (experiments/, cli.py) is outside the library's rule.
    long = [
        (n, name)
        for n, name in class_lengths(exclude=("natgrad.experiments", "natgrad.cli"))
        if n > MAX_CLASS_LINES
    ]
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"


if __name__ == "__main__":
    graph = import_graph()
    cycles = import_cycles(graph)
    print(f"import cycles ({len(cycles)}):")
    for cycle in cycles:
        print("  " + " <-> ".join(cycle))
    print("longest classes:")
    for n, name in class_lengths()[:8]:
        print(f"  {n:4d}  {name}")
