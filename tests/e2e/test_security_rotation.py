"""Certificate rotation end to end: the certificate the server's Envoy serves,
read with `openssl s_client`, verifies against the mesh root with `openssl verify` and
carries exactly the server's SPIFFE URI SAN; with 30 s certificates both agents rotate
at least twice while a steady request loop sees zero failures and no Envoy restarts.

The s_client side uses a test identity of its own (a token from `meshpilot token
create`, a CSR to the CA): the agents' keys never leave their workdirs. A
DestinationRule caps upstream connections at one request each (no `tls`, so auto mTLS
stays on), so every request of the loop is a fresh mTLS handshake between the sidecars
with whatever certificates they hold at that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.harness import ProcessTracker, wait_for
from tests.e2e.secure_mesh import (
    SERVER_PORT,
    SecureMesh,
    issue_identity,
    openssl_binary,
    s_client,
    spiffe,
    start_secure_mesh,
)
from tests.unit.ca._helpers import openssl_verify

CERT_TTL_S = 30
ROTATIONS = 2
LOAD_RPS = 15
ROTATION_DEADLINE_S = CERT_TTL_S * (ROTATIONS * 0.55) + 15

DR_ONE_REQUEST_PER_CONNECTION = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: server, namespace: default}
spec:
  host: server.default.svc.cluster.local
  trafficPolicy:
    connectionPool:
      http: {maxRequestsPerConnection: 1}
"""


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Not tmp_path: the agents' SDS socket paths must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="mp-rot-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@dataclass
class Load:
    """A steady request loop from the client app through both sidecars."""

    ok: int = 0
    failures: list[str] = field(default_factory=list)
    started: float = 0.0
    stopped: float = 0.0

    async def run(self, mesh: SecureMesh, stop: asyncio.Event) -> None:
        self.started = time.monotonic()
        n = 0
        while not stop.is_set():
            n += 1
            try:
                resp = await mesh.call("client", f"/load/{n}", timeout=5)
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"#{n}: HTTP {resp.status} {resp.text[:200]}")
            except Exception as e:
                self.failures.append(f"#{n}: {e!r}")
            # Paced from the start, so a slow request does not lower the rate for good.
            delay = self.started + n / LOAD_RPS - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        self.stopped = time.monotonic()

    @property
    def rate(self) -> float:
        return (self.ok + len(self.failures)) / max(self.stopped - self.started, 1e-9)


def leaf_of(pems: list[str]) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pems[0].encode())


def sha256_hex(cert: x509.Certificate) -> str:
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


async def test_served_certificate_verifies_and_rotates_without_failed_requests(
    processes: ProcessTracker, tmp_path: Path, short_dir: Path
) -> None:
    openssl_binary()  # fail now, not after the mesh is up
    t0 = time.monotonic()
    mesh = await start_secure_mesh(
        processes,
        tmp_path,
        short_dir,
        clients={"client": "client"},
        cert_ttl=f"{CERT_TTL_S}s",
        extra_config={"dr-server.yaml": DR_ONE_REQUEST_PER_CONNECTION},
    )
    live_s = time.monotonic() - t0
    server, client = mesh.server, mesh.clients["client"]
    root = mesh.cp.root_cert

    async def through() -> bool:
        resp = await mesh.call("client", "/first")
        return resp.status == 200 and "x-forwarded-client-cert" in mesh.app.requests[-1].headers

    await wait_for(through, 10, message="client -> server over mTLS")
    probe_cert, probe_key = await issue_identity(mesh.cp, tmp_path / "probe", "probe")

    # What the server's Envoy serves: verifies against the root (s_client's own check
    # and `openssl verify`), exactly the SPIFFE URI SAN, the lifetime asked for, and
    # the certificate Envoy's /certs reports.
    served = await s_client(server.ip, SERVER_PORT, root=root, cert=probe_cert, key=probe_key)
    assert "Verify return code: 0 (ok)" in served.verify_line, served.output
    untrusted = None
    if len(served.pems) > 1:
        untrusted = tmp_path / "intermediates.pem"
        untrusted.write_text("".join(served.pems[1:]))
    verdict = await asyncio.to_thread(openssl_verify, tmp_path, root, served.pems[0], untrusted)
    assert verdict.strip().endswith(": OK"), verdict
    leaf = leaf_of(served.pems)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(spiffe("server"))]
    lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert CERT_TTL_S - 1 <= lifetime <= CERT_TTL_S + 120, lifetime  # CA backdating allowed
    assert int((await server.admin.workload_cert())["serial"], 16) == leaf.serial_number

    # Rotation under load.
    envoy_pids = {w.name: w.agent.envoy_pid() for w in (server, client)}
    handshakes_before = await server.handshakes_in()
    first_seen = time.monotonic()
    served_serials: dict[int, float] = {leaf.serial_number: 0.0}
    client_serials: dict[str, float] = {(await client.admin.workload_cert())["serial"]: 0.0}
    probe_failures: list[str] = []
    stop = asyncio.Event()
    load = Load()
    load_task = asyncio.create_task(load.run(mesh, stop))
    try:

        async def rotated_twice() -> bool:
            now = time.monotonic() - first_seen
            try:
                chain = await s_client(
                    server.ip, SERVER_PORT, root=root, cert=probe_cert, key=probe_key
                )
                assert "Verify return code: 0 (ok)" in chain.verify_line, chain.output
            except AssertionError as e:  # counted, not retried away
                probe_failures.append(f"{now:.1f} s: {e}")
                return False
            served_serials.setdefault(leaf_of(chain.pems).serial_number, now)
            client_serials.setdefault((await client.admin.workload_cert())["serial"], now)
            return len(served_serials) > ROTATIONS and len(client_serials) > ROTATIONS

        await wait_for(
            rotated_twice,
            ROTATION_DEADLINE_S,
            interval=1.0,
            message=f"{ROTATIONS} rotations of both workload certificates",
        )
        # A few more requests with the newest certificates on both sides.
        await asyncio.sleep(1.0)
    finally:
        stop.set()
        await load_task

    assert not probe_failures, probe_failures
    assert not load.failures, f"{len(load.failures)} failed requests: {load.failures[:10]}"
    duration = load.stopped - load.started
    assert load.ok >= 5 * duration, f"only {load.ok} requests in {duration:.1f} s"
    assert {w.name: w.agent.envoy_pid() for w in (server, client)} == envoy_pids
    assert all(w.agent.process.running for w in (server, client))
    # xDS over mTLS outlives the certificates its connection was opened with.
    for w in (server, client):
        assert await w.stat("control_plane.connected_state") == 1, w.name
    # Every request was a fresh mTLS handshake at the server's sidecar.
    handshakes = await server.handshakes_in() - handshakes_before
    assert handshakes >= load.ok, (handshakes, load.ok)
    # The server sees the client's newest certificate.
    xfcc = mesh.app.requests[-1].headers.get("x-forwarded-client-cert", "")
    client_chain = await asyncio.to_thread((client.agent.workdir / "cert-chain.pem").read_bytes)
    assert f"Hash={sha256_hex(x509.load_pem_x509_certificate(client_chain))}" in xfcc, xfcc
    assert int((await server.admin.workload_cert())["serial"], 16) in served_serials

    served_at = sorted(served_serials.values())
    client_at = sorted(client_serials.values())
    print(
        f"\nmesh LIVE {live_s:.1f} s after start (agent's first certificate: "
        f"server {_took_ms(server.agent.process.log_text())} ms, "
        f"client {_took_ms(client.agent.process.log_text())} ms); "
        f"TTL {CERT_TTL_S} s: served serial changed at "
        f"{', '.join(f'{t:.1f}' for t in served_at[1:])} s, client's at "
        f"{', '.join(f'{t:.1f}' for t in client_at[1:])} s (polled every 1 s); "
        f"{load.ok} requests ok, 0 failed, {load.rate:.1f}/s over {duration:.1f} s; "
        f"{handshakes} TLS handshakes at the server's sidecar; Envoy pids unchanged"
    )


def _took_ms(log: str) -> str:
    for line in log.splitlines():
        if "first certificate ready" in line:
            return line.rsplit("took_ms=", 1)[1].split()[0]
    return "?"
