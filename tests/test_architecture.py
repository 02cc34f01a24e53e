"""The spine stays clean: imports only point down the layers of design.md, no module
imports itself through a cycle, files stay readable in one sitting and functions short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "backdoors"

# Each unit (a top-level module or subpackage of backdoors) and its layer: a unit may
# import only units of lower layers. Leaves at the bottom, the command line at the top.
LAYERS: dict[str, int] = {
    "version": 0, "errors": 0, "typecheck": 0, "seeds": 0, "batch": 0,
    "config": 1, "registry": 1, "hooks": 1, "runs": 1,
    "data": 2, "models": 2, "execution": 2,
    "synthesizers": 3,
    "metrics": 4, "attacks": 4,
    "training": 5,
    "defenses": 6, "federated": 6,
    "assembly": 7,
    "experiment": 8,
    "gallery": 9, "legacy": 9, "crashtest": 9, "sweeps": 9, "prepare": 9,
    "report": 10,
    "cli": 11,
    "__init__": 12, "__main__": 12,
}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 300, 60


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every backdoors module `path` imports, at any depth of its code (function-level
    imports count: they run sooner or later)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("backdoors")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("backdoors"):
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_every_unit_has_a_layer():
    assert {_unit(m) for m in MODULES} <= set(LAYERS), "add new packages to LAYERS"


def test_imports_point_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
                    if _unit(a) != _unit(b) and LAYERS[_unit(a)] <= LAYERS[_unit(b)])
    assert not upward, upward


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for module in MODULES:
        if module not in state:
            cycle = visit(module)
            assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_files_and_functions_stay_short(module):
    text = MODULES[module].read_text()
    assert len(text.splitlines()) <= MAX_FILE_LINES, f"{module}: split the file"
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(ast.parse(text))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{module}: {long}"
