"""`meshpilot agent` end to end: the real CA and secure port (`meshpilot serve --ca-dir`),
a real agent process, and the real Envoy it starts and supervises.

Measured and printed (run with `-s`): agent start -> first certificate served over SDS,
and the agent's resident memory. Reusable pieces live in `tests/e2e/agents.py`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.e2e.agents import (
    AGENT_SLIM,
    process_exists,
    rss_kib,
    start_agent,
    start_secure_control_plane,
)
from tests.e2e.harness import ManagedProcess, ProcessTracker, wait_for

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/client"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Not tmp_path: the agent's SDS socket path must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="mp-e2e-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


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


def agent_took_ms(log: str) -> str:
    """The agent's own figure: from its start (after imports) to the first certificate."""
    for line in log.splitlines():
        if "first certificate ready" in line:
            return line.rsplit("took_ms=", 1)[1].split()[0]
    return "?"


async def exited(proc: ManagedProcess, timeout: float = 15) -> int:  # noqa: ASYNC109
    await wait_for(lambda: proc.returncode is not None, timeout, message=f"{proc.name} to exit")
    code = proc.returncode
    assert code is not None
    return code


async def test_agent_serves_rotates_and_stops_with_envoy(
    processes: ProcessTracker, tmp_path: Path, short_dir: Path
) -> None:
    cp = await start_secure_control_plane(processes, tmp_path)
    agent = await start_agent(
        processes,
        cp,
        short_dir / "w",
        name="client-1",
        service_account="client",
        labels={"app": "client"},
        cert_ttl="10s",
    )
    secret = await first_secret_over_sds(agent.sds_socket)
    first_cert_s = time.monotonic() - agent.spawned_at
    assert b"BEGIN CERTIFICATE" in secret.tls_certificate.certificate_chain.inline_bytes
    assert secret.tls_certificate.private_key.inline_bytes.startswith(b"-----BEGIN PRIVATE KEY")

    # Envoy holds the workload certificate (exactly the SPIFFE SAN) and the root, talks
    # xDS to the secure port over mutual TLS with it, and goes LIVE.
    admin = agent.admin
    await admin.wait_live()
    first = await admin.workload_cert()
    assert first["uris"] == [CLIENT_ID]
    assert first["ca"], "ROOTCA missing from Envoy's /certs"
    dump = await admin.get("/config_dump?resource=dynamic_active_secrets")
    assert {c["name"] for c in dump["configs"]} == {"default", "ROOTCA"}
    envoy_pid = agent.envoy_pid()

    # 10 s certificates renew at ~5 s: the serial changes at least twice, same Envoy.
    serials = [first["serial"]]

    async def two_rotations() -> bool:
        serial = (await admin.workload_cert())["serial"]
        if serial != serials[-1]:
            serials.append(serial)
        return len(serials) >= 3

    await wait_for(two_rotations, 30, interval=0.2, message="two certificate rotations")
    assert agent.envoy_pid() == envoy_pid, "Envoy was restarted"
    assert await admin.stat("control_plane.connected_state") == 1
    rss = rss_kib(agent.process.pid)
    print(
        f"\nagent: process start -> first certificate over SDS {first_cert_s * 1000:.0f} ms "
        f"(agent's own count after imports: {agent_took_ms(agent.process.log_text())} ms); "
        f"RSS {rss / 1024:.1f} MiB (`meshpilot agent`); serials {serials}"
    )
    assert rss < 200 * 1024

    os.kill(agent.process.pid, signal.SIGTERM)
    assert await exited(agent.process) == 0
    assert not process_exists(envoy_pid), "Envoy outlived its agent"
    log = agent.process.log_text()
    assert "envoy draining" in log and "status=200" in log
    # Secrets and tokens never reach the logs.
    assert "PRIVATE KEY" not in log
    token = (short_dir / "w.token").read_text().strip()
    assert token and token not in log


async def test_envoy_exit_ends_the_agent_with_its_status(
    processes: ProcessTracker, tmp_path: Path, short_dir: Path
) -> None:
    cp = await start_secure_control_plane(processes, tmp_path)
    # The slim entry point (no control-plane imports): same flags, smaller process.
    agent = await start_agent(
        processes,
        cp,
        short_dir / "w",
        name="client-1",
        service_account="client",
        entry=AGENT_SLIM,
        envoy_args=("--concurrency", "1"),
    )
    await wait_for(agent.admin.workload_cert, 20, message="Envoy to load the default secret")
    # No level given: Envoy runs at Istio's default, warning.
    levels = await agent.admin.log_levels()
    assert levels and set(levels.values()) == {"warning"}, levels
    envoy_pid = agent.envoy_pid()
    print(f"\nagent: RSS {rss_kib(agent.process.pid) / 1024:.1f} MiB (`python -m meshpilot.agent`)")
    os.kill(envoy_pid, signal.SIGKILL)
    assert await exited(agent.process) == 128 + signal.SIGKILL
    assert "envoy exited" in agent.process.log_text()


async def test_envoy_does_not_outlive_a_killed_agent(
    processes: ProcessTracker, tmp_path: Path, short_dir: Path
) -> None:
    cp = await start_secure_control_plane(processes, tmp_path)
    agent = await start_agent(
        processes,
        cp,
        short_dir / "w",
        name="client-1",
        service_account="client",
        agent_args=("--proxy-log-level", "error"),
        envoy_args=("--concurrency", "1"),
    )
    await wait_for(agent.admin.workload_cert, 20, message="Envoy to load the default secret")
    levels = await agent.admin.log_levels()
    assert levels and set(levels.values()) == {"error"}, levels
    envoy_pid = agent.envoy_pid()
    # No chance to drain: the kernel's parent-death signal must take Envoy down.
    os.kill(agent.process.pid, signal.SIGKILL)
    assert await exited(agent.process) == -signal.SIGKILL
    await wait_for(lambda: not process_exists(envoy_pid), 5, message="Envoy to die with its agent")
