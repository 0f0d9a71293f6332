"""The agent process stays light: run for real through each entry point (`python -m
meshpilot agent`, the `meshpilot` console script's path, and `python -m meshpilot.agent`)
until its certificate is issued and its (stand-in) Envoy has run, it has loaded nothing of
the control plane, no config-model or web library, no cryptography library (a helper
process makes keys and CSRs) and not the system's OpenSSL, bz2 or lzma."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from . import _fakeca

IDENTITY = "spiffe://cluster.local/ns/default/sa/client"

# Runs MODULE as `python -m MODULE ARGS...` would, then, at interpreter exit (after the
# agent has returned its status), writes the names of every module loaded to OUT.
RUN_AND_LIST_MODULES = """\
import atexit, json, runpy, sys
out, module, *args = sys.argv[1:]
def dump():
    with open(out, "w") as f:
        json.dump(sorted(k for k, v in sys.modules.items() if v is not None), f)
atexit.register(dump)
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

# Stands in for Envoy: records that it was started (only after the first certificate),
# then exits 0, which ends the agent with status 0.
FAKE_ENVOY = """\
import os, sys
boot = sys.argv[sys.argv.index("-c") + 1]
open(os.path.join(os.path.dirname(boot), "fake-envoy.ran"), "w").close()
"""

# Third-party packages the agent has no use for: config models, YAML, HTTP, Kubernetes,
# JWT signing, metrics, file watching.
BLOCKED_PACKAGES = (
    "pydantic",
    "pydantic_core",
    "yaml",
    "aiohttp",
    "kubernetes_asyncio",
    "jwt",
    "prometheus_client",
    "watchfiles",
    "re2",
    # The agent writes structlog's line formats itself (meshpilot/agent/logfmt.py).
    "structlog",
    # Keys and CSRs are made by a short-lived helper process (meshpilot/agent/pki.py).
    "cryptography",
    "_cffi_backend",
    # Bindings to system libraries it has no use for (see meshpilot/agent/__main__.py).
    "ssl",
    "_ssl",
    "_hashlib",
    "bz2",
    "lzma",
)
# The only parts of meshpilot the agent may load; everything else is the control plane.
ALLOWED_MESHPILOT = (
    "meshpilot",
    "meshpilot.__main__",
    "meshpilot.cli",
    "meshpilot.addresses",
    "meshpilot.durations",
    "meshpilot.envflags",
    "meshpilot.procutil",
    "meshpilot.protos",
    "meshpilot.protos.istio_ca_pb2",
    "meshpilot.protos.istio_ca_pb2_grpc",
    "meshpilot.xds",
    "meshpilot.xds.protocol",
)


def unwanted(modules: list[str]) -> list[str]:
    out = []
    for name in modules:
        top = name.split(".", 1)[0]
        if top in BLOCKED_PACKAGES or name in BLOCKED_PACKAGES:
            out.append(name)
        elif top == "meshpilot" and not (
            name in ALLOWED_MESHPILOT or name.startswith("meshpilot.agent")
        ):
            out.append(name)
    return out


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short on purpose: the SDS socket path must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="mp-light-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def ca() -> AsyncIterator[tuple[_fakeca.FakeCA, int]]:
    fake = _fakeca.FakeCA(tokens={"tok": IDENTITY})
    server, port = await _fakeca.start(fake)
    try:
        yield fake, port
    finally:
        await server.stop(None)


def agent_args(base: Path, ca: _fakeca.FakeCA, port: int) -> list[str]:
    (base / "root.pem").write_bytes(ca.root_pem)
    (base / "token").write_text("tok\n")
    envoy = base / "fake-envoy"
    envoy.write_text(f"#!{sys.executable}\n{FAKE_ENVOY}")
    envoy.chmod(0o755)
    return [
        "--name",
        "light-1",
        "--namespace",
        "default",
        "--service-account",
        "client",
        "--token-file",
        str(base / "token"),
        "--ca-address",
        f"127.0.0.1:{port}",
        "--root-cert",
        str(base / "root.pem"),
        "--workdir",
        str(base / "w"),
        "--admin-port",
        "0",
        "--envoy-binary",
        str(envoy),
        "--log-format",
        "json",
    ]


@pytest.mark.parametrize(
    "command",
    [["meshpilot", "agent"], ["meshpilot.agent"]],
    ids=["python -m meshpilot agent", "python -m meshpilot.agent"],
)
async def test_the_agent_process_loads_nothing_of_the_control_plane(
    command: list[str], ca: tuple[_fakeca.FakeCA, int], workdir: Path
) -> None:
    fake, port = ca
    listing = workdir / "modules.json"
    argv = [sys.executable, "-c", RUN_AND_LIST_MODULES, str(listing), *command]
    proc = await asyncio.create_subprocess_exec(
        *argv, *agent_args(workdir, fake, port), stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    log = stderr.decode(errors="replace")
    assert proc.returncode == 0, log
    # It did all of its work: certificate issued, SDS served, Envoy started and exited.
    assert [i.identity for i in fake.issued] == [IDENTITY]
    assert (workdir / "w" / "fake-envoy.ran").exists()
    assert "first certificate ready" in log
    modules = json.loads(listing.read_text())
    assert "meshpilot.agent.sds" in modules and "grpc" in modules
    assert "meshpilot.agent.pki" not in modules
    assert unwanted(modules) == []


def test_the_blocklist_catches_the_control_plane() -> None:
    # The check above would pass vacuously if the names it compares were wrong.
    loaded = ["meshpilot.model.index", "pydantic.main", "ssl", "meshpilot.xds.server"]
    assert unwanted([*loaded, "meshpilot.agent.sds", "meshpilot.xds.protocol", "grpc"]) == loaded
