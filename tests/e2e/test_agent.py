"""`meshpilot agent` end to end: the real CA and secure port (`meshpilot serve --ca-dir`),
a real agent process, and the real Envoy it starts and supervises.

Measured and printed (run with `-s`): agent start -> first certificate served over SDS,
and the agent's resident memory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.e2e.harness import (
    ManagedProcess,
    ProcessTracker,
    free_port,
    http_get,
    port_open,
    unique_loopback_ip,
    wait_for,
)

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


@dataclass
class ControlPlane:
    ip: str
    secure_address: str
    ca_dir: Path
    process: ManagedProcess

    @property
    def root_cert(self) -> Path:
        return self.ca_dir / "root-cert.pem"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Not tmp_path: the agent's SDS socket path must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="mp-e2e-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


async def start_control_plane(processes: ProcessTracker, tmp_path: Path) -> ControlPlane:
    ip = unique_loopback_ip()
    secure, plain, monitoring = free_port(ip), free_port(ip), free_port(ip)
    config = tmp_path / "config"
    config.mkdir(exist_ok=True)
    ca_dir = tmp_path / "ca"
    argv = [sys.executable, "-m", "meshpilot", "serve", "--config-dir", str(config)]
    argv += ["--ca-dir", str(ca_dir), "--secure-xds-address", f"{ip}:{secure}"]
    argv += ["--xds-address", f"{ip}:{plain}", "--monitoring-address", f"{ip}:{monitoring}"]
    proc = await processes.spawn(
        argv, ready_line=None, ready=lambda: port_open(ip, secure), timeout=20, name="meshpilot"
    )
    return ControlPlane(ip, f"{ip}:{secure}", ca_dir, proc)


async def mint_token(cp: ControlPlane, path: Path, service_account: str = "client") -> None:
    argv = [sys.executable, "-m", "meshpilot", "token", "create", "--ca-dir", str(cp.ca_dir)]
    argv += ["--namespace", "default", "--service-account", service_account]
    done = await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(done.stdout)


def agent_argv(
    cp: ControlPlane,
    workdir: Path,
    token: Path,
    *,
    cert_ttl: str,
    entry: tuple[str, ...] = ("-m", "meshpilot", "agent"),
) -> list[str]:
    return [
        sys.executable,
        *entry,
        "--name",
        "client-1",
        "--namespace",
        "default",
        "--service-account",
        "client",
        "--token-file",
        str(token),
        "--ca-address",
        cp.secure_address,
        "--root-cert",
        str(cp.root_cert),
        "--ip",
        cp.ip,
        "--label",
        "app=client",
        "--workdir",
        str(workdir),
        "--cert-ttl",
        cert_ttl,
        "--admin-port",
        "0",
        "--termination-drain-duration",
        "0.3s",
        "--",
        "--log-level",
        "warn",
        "--concurrency",
        "1",
    ]


async def first_secret_over_sds(socket_path: Path, timeout: float = 20) -> secret_pb2.Secret:  # noqa: ASYNC109
    """Subscribe `default` on the agent's socket as Envoy does; ACK until it arrives."""
    async with asyncio.timeout(timeout):
        # The agent binds the socket when it starts; poll for it as Envoy would retry.
        while not await asyncio.to_thread(socket_path.exists):  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            # The socket file appears at bind(), a moment before listen(): wait, not fail.
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            call = stub.StreamSecrets(wait_for_ready=True)
            await call.write(
                discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=["default"])
            )
            async for resp in call:
                for any_msg in resp.resources:
                    secret = secret_pb2.Secret()
                    any_msg.Unpack(secret)
                    if secret.name == "default":
                        call.cancel()
                        return secret
                await call.write(
                    discovery_pb2.DiscoveryRequest(
                        type_url=SECRET_TYPE,
                        resource_names=["default"],
                        version_info=resp.version_info,
                        response_nonce=resp.nonce,
                    )
                )
    raise AssertionError("the SDS stream ended without the default secret")


def children(pid: int) -> list[int]:
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


def process_exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def agent_took_ms(log: str) -> str:
    """The agent's own figure: from its start (after imports) to the first certificate."""
    for line in log.splitlines():
        if "first certificate ready" in line:
            return line.rsplit("took_ms=", 1)[1].split()[0]
    return "?"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class Admin:
    """Envoy's admin, found through the address file the agent asks Envoy to write."""

    def __init__(self, workdir: Path) -> None:
        self.path = workdir / "admin.address"

    async def get(self, path: str) -> Any:
        address = (await asyncio.to_thread(self.path.read_text)).strip()
        resp = await http_get(f"http://{address}{path}", timeout=2)
        assert resp.status == 200, f"{path}: {resp.status} {resp.text[:300]}"
        return resp.json() if "json" in resp.headers.get("content-type", "") else resp.text

    async def workload_cert(self) -> dict[str, Any]:
        """The `default` certificate Envoy holds (from `/certs`), with the root next to it."""
        certs = (await self.get("/certs"))["certificates"]
        for entry in certs:
            for cert in entry.get("cert_chain", []):
                uris = [s.get("uri") for s in cert.get("subject_alt_names", [])]
                if uris:
                    return {"serial": cert["serial_number"], "uris": uris, "ca": entry["ca_cert"]}
        raise AssertionError(f"no workload certificate in /certs yet: {certs}")

    async def stat(self, name: str) -> int:
        text = await self.get(f"/stats?filter=^{name.replace('.', '[.]')}$")
        for line in text.splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        return 0


async def exited(proc: ManagedProcess, timeout: float = 15) -> int:  # noqa: ASYNC109
    await wait_for(lambda: proc.returncode is not None, timeout, message=f"{proc.name} to exit")
    code = proc.returncode
    assert code is not None
    return code


async def test_agent_serves_rotates_and_stops_with_envoy(
    processes: ProcessTracker, tmp_path: Path, short_dir: Path
) -> None:
    cp = await start_control_plane(processes, tmp_path)
    token = short_dir / "token"
    await mint_token(cp, token)
    workdir = short_dir / "w"

    started = time.monotonic()
    agent = await processes.spawn(
        agent_argv(cp, workdir, token, cert_ttl="10s"), ready_line=None, name="agent"
    )
    secret = await first_secret_over_sds(workdir / "sds.sock")
    first_cert_s = time.monotonic() - started
    assert b"BEGIN CERTIFICATE" in secret.tls_certificate.certificate_chain.inline_bytes
    assert secret.tls_certificate.private_key.inline_bytes.startswith(b"-----BEGIN PRIVATE KEY")

    # Envoy holds the workload certificate (exactly the SPIFFE SAN) and the root...
    admin = Admin(workdir)
    first = await wait_for(admin.workload_cert, 20, message="Envoy to load the default secret")
    assert first["uris"] == [CLIENT_ID]
    assert first["ca"], "ROOTCA missing from Envoy's /certs"
    dump = await admin.get("/config_dump?resource=dynamic_active_secrets")
    assert {c["name"] for c in dump["configs"]} == {"default", "ROOTCA"}
    # ...and talks xDS to the secure port over mutual TLS with it, and goes LIVE.
    await wait_for(
        lambda: admin.stat("control_plane.connected_state"),
        20,
        message="Envoy's ADS stream over mTLS to the secure port",
    )
    await wait_for(lambda: admin.get("/ready"), 20, message="Envoy LIVE")
    (envoy_pid,) = children(agent.pid)

    # 10 s certificates renew at ~5 s: the serial changes at least twice, same Envoy.
    serials = [first["serial"]]

    async def two_rotations() -> bool:
        serial = (await admin.workload_cert())["serial"]
        if serial != serials[-1]:
            serials.append(serial)
        return len(serials) >= 3

    await wait_for(two_rotations, 30, interval=0.2, message="two certificate rotations")
    assert children(agent.pid) == [envoy_pid], "Envoy was restarted"
    assert await admin.stat("control_plane.connected_state") == 1
    rss = rss_kib(agent.pid)
    print(
        f"\nagent: process start -> first certificate over SDS {first_cert_s * 1000:.0f} ms "
        f"(agent's own count after imports: {agent_took_ms(agent.log_text())} ms); "
        f"RSS {rss / 1024:.1f} MiB (`meshpilot agent`); serials {serials}"
    )
    assert rss < 200 * 1024

    os.kill(agent.pid, signal.SIGTERM)
    assert await exited(agent) == 0
    assert not process_exists(envoy_pid), "Envoy outlived its agent"
    log = agent.log_text()
    assert "envoy draining" in log and "status=200" in log
    # Secrets and tokens never reach the logs.
    assert "PRIVATE KEY" not in log
    assert token.read_text().strip() not in log


async def test_envoy_exit_ends_the_agent_with_its_status(
    processes: ProcessTracker, tmp_path: Path, short_dir: Path
) -> None:
    cp = await start_control_plane(processes, tmp_path)
    token = short_dir / "token"
    await mint_token(cp, token)
    workdir = short_dir / "w"
    # The slim entry point (no control-plane imports): same flags, smaller process.
    argv = agent_argv(cp, workdir, token, cert_ttl="1h", entry=("-m", "meshpilot.agent"))
    agent = await processes.spawn(argv, ready_line=None, name="agent")
    admin = Admin(workdir)
    await wait_for(admin.workload_cert, 20, message="Envoy to load the default secret")
    (envoy_pid,) = children(agent.pid)
    print(f"\nagent: RSS {rss_kib(agent.pid) / 1024:.1f} MiB (`python -m meshpilot.agent`)")
    os.kill(envoy_pid, signal.SIGKILL)
    assert await exited(agent) == 128 + signal.SIGKILL
    assert "envoy exited" in agent.log_text()
