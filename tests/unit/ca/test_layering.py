"""meshpilot/ca/ sits below the model, the xDS server and the API types.

The CA is started by serve.py and may be embedded without a control plane; it
must not pull in the mesh model or xDS (meshpilot/secure_port.py wires ADS onto
the secure port from above).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import meshpilot.ca

FORBIDDEN = ("meshpilot.xds", "meshpilot.model", "meshpilot.api", "meshpilot.translators")


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_ca_modules_import_nothing_above_them() -> None:
    ca_dir = Path(meshpilot.ca.__file__).parent
    modules = sorted(ca_dir.glob("*.py"))
    assert len(modules) > 5
    bad = {
        f"{m.name}: {name}"
        for m in modules
        for name in _imports(m)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert not bad, f"meshpilot/ca/ imports from higher floors: {sorted(bad)}"


def test_importing_every_ca_module_loads_nothing_above_them() -> None:
    # Transitively too: a fresh interpreter imports each CA module, then lists what
    # of the forbidden packages got loaded.
    ca_dir = Path(meshpilot.ca.__file__).parent
    names = [f"meshpilot.ca.{m.stem}" for m in sorted(ca_dir.glob("*.py")) if m.stem != "__init__"]
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module(n)\n"
        f"print(sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r})))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"importing meshpilot/ca/ loads: {done.stdout.strip()}"
