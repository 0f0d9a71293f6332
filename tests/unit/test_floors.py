"""The floors of the layout: every import points down (docs/architecture.md).

Read statically from the source, so an import hidden behind `TYPE_CHECKING` or inside
a function counts as much as one at the top of a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "meshpilot"

LEAVES = {"addresses", "durations", "envflags", "logs", "procutil", "secretfile", "untrusted"}

# floor -> the meshpilot packages (first component below meshpilot) it may import.
ALLOWED: dict[str, set[str]] = {
    "config": set(),
    "api": {"config"},
    "discovery": {"config", "api", "monitoring", "kube"},
    "model": {"config", "api"},
    "analysis": {"config", "api", "model"},
    "translators": {"config", "api", "model"},
    "ca": {"protos", "monitoring", "kube"},
    "agent": {"protos", "xds.protocol"},
    "monitoring": set(),
    "kube": set(),
    "inject": {"monitoring"},
}


def meshpilot_imports(path: Path) -> set[str]:
    """Dotted names below `meshpilot.` that a module imports, anywhere in its body."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n.removeprefix("meshpilot.") for n in names if n.startswith("meshpilot."))
    return found


def allowed(floor: str, target: str) -> bool:
    top = target.split(".")[0]
    if top == floor or top in LEAVES:
        return True
    return any(target == a or target.startswith(a + ".") or top == a for a in ALLOWED[floor])


@pytest.mark.parametrize("floor", sorted(ALLOWED))
def test_imports_point_down(floor: str) -> None:
    bad = []
    for path in sorted((PACKAGE / floor).rglob("*.py")):
        for target in sorted(meshpilot_imports(path)):
            # `from meshpilot.xds import protocol` names the package first: judge the
            # module it brings in, not the package.
            if target in {"xds"} and floor == "agent":
                continue
            if not allowed(floor, target):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports meshpilot.{target}")
    assert not bad, "imports pointing up a floor:\n" + "\n".join(bad)


def test_leaves_import_no_other_floor() -> None:
    bad = []
    for name in sorted(LEAVES):
        path = PACKAGE / f"{name}.py"
        if not path.exists():
            continue
        for target in meshpilot_imports(path):
            if target.split(".")[0] not in LEAVES:
                bad.append(f"{name}.py imports meshpilot.{target}")
    assert not bad, "\n".join(bad)
