"""The translators import each other without cycles and import the model directly.

A cycle hidden by a function-level import, or an import kept out of runtime by
`if TYPE_CHECKING`, works until someone imports the modules in another order; these
tests look at the source (every import, wherever it is) and import each module
first thing in a fresh interpreter.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
TRANSLATORS = ROOT / "meshpilot" / "translators"
MODEL = ROOT / "meshpilot" / "model"
UPPER_FLOORS = ("meshpilot.discovery", "meshpilot.xds", "meshpilot.serve")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.py"))


def _imported(tree: ast.AST) -> set[str]:
    """Every meshpilot module a source imports, at module level or inside a function."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("meshpilot"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if not node.module.startswith("meshpilot"):
                continue
            out.add(node.module)
            # `from meshpilot.translators import naming` imports a module too.
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _translator_graph() -> dict[str, set[str]]:
    names = {_module_name(p) for p in _modules(TRANSLATORS)}
    graph: dict[str, set[str]] = {}
    for path in _modules(TRANSLATORS):
        deps = _imported(ast.parse(path.read_text()))
        graph[_module_name(path)] = {d for d in deps if d in names and d != _module_name(path)}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_find_cycle_reports_a_cycle() -> None:
    """The checker itself: a -> b -> c -> a is found, a DAG is not."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_translators_have_no_import_cycle() -> None:
    graph = _translator_graph()
    assert "meshpilot.translators.plan" in graph
    assert _find_cycle(graph) is None


@pytest.mark.parametrize("path", _modules(TRANSLATORS), ids=lambda p: p.stem)
def test_each_translator_imports_first_in_a_fresh_interpreter(path: Path) -> None:
    module = _module_name(path)
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"import {module} failed:\n{result.stderr[-2000:]}"


def _type_checking_imports(tree: ast.Module) -> set[str]:
    """meshpilot modules imported under a top-level `if TYPE_CHECKING:`."""
    out: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                out.update(_imported(stmt))
    return out


def test_type_checking_scan_sees_guarded_imports() -> None:
    src = "if TYPE_CHECKING:\n    from meshpilot.xds.server import DiscoveryServer\n"
    assert "meshpilot.xds.server" in _type_checking_imports(ast.parse(src))


@pytest.mark.parametrize(
    "path", [*_modules(TRANSLATORS), *_modules(MODEL)], ids=lambda p: _module_name(p)
)
def test_no_type_checking_import_from_an_upper_floor(path: Path) -> None:
    """Translators and model import what they use at runtime; an upper-floor import
    hidden behind TYPE_CHECKING would be a dependency pointing up the floors, and in
    the translators a guarded meshpilot import only hides a cycle."""
    guarded = _type_checking_imports(ast.parse(path.read_text()))
    upward = sorted(g for g in guarded if g.startswith(UPPER_FLOORS))
    assert not upward, f"{path.name} imports {upward} under TYPE_CHECKING"
    if path.parent == TRANSLATORS:
        assert not guarded, f"{path.name} imports {sorted(guarded)} under TYPE_CHECKING"
