"""Workloads with `meshpilot agent` + Envoy against a real CA and secure port, for e2e tests.

    cp = await start_secure_control_plane(processes, tmp_path, config_dir=config)
    client = await start_agent(processes, cp, short_dir / "client", name="client-1",
                               service_account="client", ip=unique_loopback_ip())
    await client.admin.wait_live()
    cert = await client.admin.workload_cert()      # serial, SPIFFE URIs, root

`short_dir` must be short (e.g. `tempfile.mkdtemp(prefix="mp-e2e-")`): the agent's SDS
socket lives in the workdir and a unix socket path is limited to 107 bytes, more than
pytest's `tmp_path` leaves. Every process is tracked by `processes` and stopped by pid.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.e2e.harness import (
    ManagedProcess,
    ProcessTracker,
    free_port,
    http_get,
    http_request,
    port_open,
    unique_loopback_ip,
    wait_for,
)

AGENT_CLI = ("-m", "meshpilot", "agent")
AGENT_SLIM = ("-m", "meshpilot.agent")


@dataclass
class SecureControlPlane:
    """`meshpilot serve --ca-dir` as a process: CA + xDS over TLS on `secure_address`."""

    ip: str
    secure_address: str
    xds_address: str
    monitoring_address: str
    ca_dir: Path
    config_dir: Path
    process: ManagedProcess

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "root-cert.pem"

    async def write_token(self, path: Path, namespace: str, service_account: str) -> Path:
        """`meshpilot token create` into `path` (mode 0600)."""
        argv = [sys.executable, "-m", "meshpilot", "token", "create"]
        argv += ["--ca-dir", str(self.ca_dir), "--namespace", namespace]
        argv += ["--service-account", service_account]
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=30, check=False
        )
        assert done.returncode == 0, done.stderr
        await asyncio.to_thread(_write_private, path, done.stdout)
        return path


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


async def start_secure_control_plane(
    processes: ProcessTracker,
    tmp_path: Path,
    *,
    config_dir: Path | None = None,
    extra_args: Sequence[str] = (),
) -> SecureControlPlane:
    """Start `meshpilot serve --ca-dir` on a unique loopback address; ready on return."""
    ip = unique_loopback_ip()
    secure, plain, monitoring = free_port(ip), free_port(ip), free_port(ip)
    if config_dir is None:
        config_dir = tmp_path / "config"
        config_dir.mkdir(exist_ok=True)
    ca_dir = tmp_path / "ca"
    argv = [sys.executable, "-m", "meshpilot", "serve", "--config-dir", str(config_dir)]
    argv += ["--ca-dir", str(ca_dir), "--secure-xds-address", f"{ip}:{secure}"]
    argv += ["--xds-address", f"{ip}:{plain}", "--monitoring-address", f"{ip}:{monitoring}"]
    argv += list(extra_args)
    proc = await processes.spawn(
        argv, ready_line=None, ready=lambda: port_open(ip, secure), timeout=30, name="meshpilot"
    )
    return SecureControlPlane(
        ip, f"{ip}:{secure}", f"{ip}:{plain}", f"{ip}:{monitoring}", ca_dir, config_dir, proc
    )


class AgentEnvoyAdmin:
    """The admin of the Envoy an agent started, found through the address file that the
    agent has Envoy write into its workdir."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "admin.address"

    async def url(self) -> str:
        address = (await asyncio.to_thread(self.path.read_text)).strip()
        return f"http://{address}"

    async def get(self, path: str) -> Any:
        """GET an admin path: parsed JSON when it is JSON, else text; fails on non-200."""
        resp = await http_get(await self.url() + path, timeout=2)
        assert resp.status == 200, f"{path}: {resp.status} {resp.text[:300]}"
        return resp.json() if "json" in resp.headers.get("content-type", "") else resp.text

    async def workload_cert(self) -> dict[str, Any]:
        """The certificate Envoy got as SDS `default`: `serial`, `uris`, and `ca` (ROOTCA)."""
        certs = (await self.get("/certs"))["certificates"]
        for entry in certs:
            for cert in entry.get("cert_chain", []):
                uris = [s.get("uri") for s in cert.get("subject_alt_names", [])]
                if uris:
                    return {"serial": cert["serial_number"], "uris": uris, "ca": entry["ca_cert"]}
        raise AssertionError(f"no workload certificate in /certs yet: {certs}")

    async def log_levels(self) -> dict[str, str]:
        """Envoy's active log level per logger (POST /logging without a change lists
        them; Envoy refuses GET on state-changing admin paths)."""
        resp = await http_request("POST", await self.url() + "/logging", timeout=2)
        assert resp.status == 200, f"/logging: {resp.status} {resp.text[:300]}"
        levels = {}
        for line in resp.text.splitlines()[1:]:
            name, sep, level = line.strip().partition(": ")
            if sep:
                levels[name] = level
        return levels

    async def stat(self, name: str) -> int:
        """A counter or gauge by exact name; 0 while Envoy has not created it."""
        text = await self.get(f"/stats?filter=^{name.replace('.', '[.]')}$")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0

    async def wait_live(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        """Until Envoy holds its certificate, has its ADS stream over mTLS, and is LIVE."""
        await wait_for(self.workload_cert, timeout, message="Envoy to load SDS `default`")
        await wait_for(
            lambda: self.stat("control_plane.connected_state"),
            timeout,
            message="Envoy's ADS stream over mTLS",
        )
        await wait_for(lambda: self.get("/ready"), timeout, message="Envoy LIVE")


@dataclass
class AgentWorkload:
    """One `meshpilot agent` process and the Envoy it supervises."""

    process: ManagedProcess
    workdir: Path
    admin: AgentEnvoyAdmin
    spawned_at: float  # time.monotonic() just before the process was started

    @property
    def sds_socket(self) -> Path:
        return self.workdir / "sds.sock"

    def envoy_pid(self) -> int:
        """The pid of the agent's Envoy (its only child)."""
        (pid,) = children(self.process.pid)
        return pid


async def start_agent(
    processes: ProcessTracker,
    cp: SecureControlPlane,
    workdir: Path,
    *,
    name: str,
    service_account: str,
    namespace: str = "default",
    ip: str | None = None,
    labels: Mapping[str, str] | None = None,
    cert_ttl: str = "1h",
    agent_args: Sequence[str] = (),
    envoy_args: Sequence[str] = ("--log-level", "warn", "--concurrency", "1"),
    entry: Sequence[str] = AGENT_CLI,
) -> AgentWorkload:
    """Start an agent (token minted for it) with a short `workdir`; returns at once, before
    the first certificate (wait with `admin.wait_live()`)."""
    workdir.parent.mkdir(parents=True, exist_ok=True)
    token = await cp.write_token(
        workdir.parent / f"{workdir.name}.token", namespace, service_account
    )
    argv = [sys.executable, *entry, "--name", name, "--namespace", namespace]
    argv += ["--service-account", service_account, "--token-file", str(token)]
    argv += ["--ca-address", cp.secure_address, "--root-cert", str(cp.root_cert)]
    argv += ["--ip", ip or cp.ip, "--workdir", str(workdir), "--cert-ttl", cert_ttl]
    argv += ["--admin-port", "0", "--termination-drain-duration", "0.3s"]
    for key, value in (labels or {}).items():
        argv += ["--label", f"{key}={value}"]
    argv += [*agent_args, "--", *envoy_args]
    spawned_at = time.monotonic()
    proc = await processes.spawn(argv, ready_line=None, name=f"agent-{name}")
    return AgentWorkload(proc, workdir, AgentEnvoyAdmin(workdir), spawned_at)


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid`."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces; the ppid follows the last ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def process_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
