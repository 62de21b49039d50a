"""DESIGN.md §1's import rules, checked by reading every module's imports (ast; nothing runs).

Function-level and TYPE_CHECKING imports count: a reader follows them too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "isdelta"
# Layers, lowest first: a module may import its own folder and any lower layer, never a higher
# one. estimators sits above engine only so that it cannot import it (it never imports torch).
LAYERS = {
    "outputs": 0,  # leaf helpers: atomic writes, JSON-safe numbers, versions, pyplot
    "engine": 1,
    "estimators": 2,
    "probes": 3,
    "tokens": 3,
    "training": 4,
    "integrations": 5,
    "program": 6,  # what the two programs share
    "run": 7,
    "score": 7,
    "cli": 8,  # `isdelta run|score`
}
LIBRARY = ("engine", "estimators", "probes", "tokens", "training", "integrations")
PROGRAMS = ("run", "score")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every isdelta module (and torch) that ``path`` imports, relative imports resolved."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("isdelta.") or m == "torch" or m.startswith("torch.")}


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
GRAPH = {m: {d for d in imports_of(p) if d in MODULES or d.split(".")[0] == "torch"} for m, p in MODULES.items()}


def top(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_module_has_a_layer():
    assert {top(m) for m in MODULES} - {""} <= set(LAYERS)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if top(m)))
def test_no_module_imports_a_higher_layer_or_a_sibling_program(module):
    mine = top(module)
    for dep in sorted(d for d in GRAPH[module] if d.startswith("isdelta.") and top(d)):
        theirs = top(dep)
        if theirs == mine:
            continue
        assert LAYERS[theirs] < LAYERS[mine], f"{module} imports {dep} ({theirs} is not below {mine})"
        if mine in LIBRARY:
            assert theirs not in PROGRAMS + ("program",), f"library module {module} imports {dep}"
        if mine in PROGRAMS:
            assert theirs not in PROGRAMS, f"program {module} imports the other program: {dep}"


def test_estimators_never_import_torch():
    bad = {m: sorted(d for d in GRAPH[m] if d.split(".")[0] == "torch") for m in MODULES if top(m) == "estimators"}
    assert not {m: d for m, d in bad.items() if d}


def test_no_import_circle_between_files():
    # package __init__ files re-export their folder and are left out (as in shared/tools/layers.py)
    files = {m for m, p in MODULES.items() if p.name != "__init__.py"}
    edges = {m: {d for d in GRAPH[m] if d in files and d != m} for m in files}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(edges[m]):
            assert state.get(d) != 1, "import circle: " + " -> ".join(path[path.index(d) :] + [d]) if d in path else d
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(files):
        if m not in state:
            visit(m, [m])


def test_no_module_grew_past_about_400_lines():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"split these by concern: {long}"
