"""A small secure mesh for the security end-to-end tests: the real CA and secure
port, a server workload and client workloads, each a real `meshpilot agent` + Envoy.

    mesh = await start_secure_mesh(processes, tmp_path, short_dir, clients={"client": "client"})
    resp = await mesh.call("client", "/hello")            # client app -> its sidecar -> server
    xfcc = mesh.app.requests[-1].headers["x-forwarded-client-cert"]

Explicit mode, no traffic capture (as examples/demo-mesh): the server's sidecar receives
mesh traffic on its Sidecar `ingress` listeners bound on the server's own address
(`SERVER_PORT`, `ALT_PORT`) and hands it to the app on `APP_PORT` of that address; its
WorkloadEntry (label `security.istio.io/tlsMode: istio`, service account `server`)
points at that inbound listener. Each client app calls `server:9080` through an egress
listener that its Sidecar binds on a second address of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshpilot.demo.apps import DemoServer
from meshpilot.protos import istio_ca_pb2, istio_ca_pb2_grpc
from tests.e2e.agents import (
    AgentEnvoyAdmin,
    AgentWorkload,
    SecureControlPlane,
    start_agent,
    start_secure_control_plane,
)
from tests.e2e.harness import (
    HttpResult,
    ProcessTracker,
    http_get,
    http_request,
    unique_loopback_ip,
    wait_for,
)
from tests.unit.ca._helpers import csr_pem

NAMESPACE = "default"
TRUST_DOMAIN = "cluster.local"
SERVER_PORT = 9080  # the service port and the server sidecar's inbound listener
ALT_PORT = 9081  # a second inbound listener of the server sidecar (portLevelMtls)
APP_PORT = 8080  # where the server sidecar hands requests to the app
SERVICE_HOST = f"server.{NAMESPACE}.svc.cluster.local"
SERVER_CLUSTER = f"outbound|{SERVER_PORT}||{SERVICE_HOST}"
SERVER_SNI = f"outbound_.{SERVER_PORT}_._.{SERVICE_HOST}"
ISTIOD_SAN = "istiod.istio-system.svc"
SYNCZ_TYPES = ("cluster", "listener", "route", "endpoint")
TLS_SOCKET = "envoy.transport_sockets.tls"


def spiffe(service_account: str, namespace: str = NAMESPACE) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def principal(service_account: str, namespace: str = NAMESPACE) -> str:
    """An AuthorizationPolicy principal (the SPIFFE ID without `spiffe://`)."""
    return f"{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def openssl_binary() -> str:
    """The `openssl` CLI; fails (never skips) when it is missing."""
    found = shutil.which("openssl")
    if not found:
        pytest.fail("no `openssl` on PATH; the security e2e tests never skip", pytrace=False)
    return found


# --- configuration ---------------------------------------------------------------------


def server_config(ip: str, egress_ip: str) -> dict[str, str]:
    """Service `server`, its WorkloadEntry (a sidecar: tlsMode istio) and its Sidecar."""
    return {
        "server-service.yaml": f"""apiVersion: v1
kind: Service
metadata: {{name: server, namespace: {NAMESPACE}}}
spec:
  selector: {{app: server}}
  ports:
  - {{name: http, port: {SERVER_PORT}}}
""",
        "server-workloadentry.yaml": f"""apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: server-1, namespace: {NAMESPACE}}}
spec:
  address: {ip}
  serviceAccount: server
  labels:
    app: server
    security.istio.io/tlsMode: istio
""",
        "server-sidecar.yaml": f"""apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: server, namespace: {NAMESPACE}}}
spec:
  workloadSelector:
    labels: {{app: server}}
  ingress:
  - port: {{number: {SERVER_PORT}, protocol: HTTP, name: http}}
    defaultEndpoint: 0.0.0.0:{APP_PORT}
    captureMode: NONE
  - port: {{number: {ALT_PORT}, protocol: HTTP, name: http-alt}}
    defaultEndpoint: 0.0.0.0:{APP_PORT}
    captureMode: NONE
  egress:
  - bind: {egress_ip}
    captureMode: NONE
    hosts: ["./*"]
""",
    }


def client_sidecar_yaml(app: str, egress_ip: str) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: {app}, namespace: {NAMESPACE}}}
spec:
  workloadSelector:
    labels: {{app: {app}}}
  egress:
  - port: {{number: {SERVER_PORT}, protocol: HTTP, name: http}}
    bind: {egress_ip}
    captureMode: NONE
    hosts: ["./*"]
"""


def peer_authentication_yaml(
    name: str,
    mode: str | None,
    *,
    selector: Mapping[str, str] | None = None,
    port_modes: Mapping[int, str] | None = None,
) -> str:
    """A PeerAuthentication in `default`: namespace-wide without `selector`."""
    lines = [
        "apiVersion: security.istio.io/v1",
        "kind: PeerAuthentication",
        f"metadata: {{name: {name}, namespace: {NAMESPACE}}}",
        "spec:",
    ]
    if selector:
        lines.append("  selector:")
        lines.append(
            "    matchLabels: {" + ", ".join(f"{k}: {v}" for k, v in selector.items()) + "}"
        )
    if mode:
        lines.append(f"  mtls: {{mode: {mode}}}")
    if port_modes:
        lines.append("  portLevelMtls:")
        lines += [f"    {port}: {{mode: {m}}}" for port, m in port_modes.items()]
    if len(lines) == 4:
        lines.append("  {}")
    return "\n".join(lines) + "\n"


# --- workloads ------------------------------------------------------------------------


@dataclass
class Workload:
    """A workload of the mesh: its agent + Envoy, its address, its egress bind."""

    name: str
    app: str
    service_account: str
    ip: str
    egress_ip: str
    agent: AgentWorkload

    @property
    def admin(self) -> AgentEnvoyAdmin:
        return self.agent.admin

    @property
    def node_id(self) -> str:
        return f"sidecar~{self.ip}~{self.name}.{NAMESPACE}~{NAMESPACE}.svc.cluster.local"

    async def stats(self, pattern: str) -> dict[str, int]:
        """Counters and gauges whose name contains `pattern` (a plain substring)."""
        text = await self.admin.get("/stats?filter=" + _re_escape(pattern))
        out: dict[str, int] = {}
        for line in text.splitlines():
            key, sep, value = line.partition(": ")
            if sep and value.strip().isdigit():
                out[key] = int(value)
        return out

    async def stat(self, name: str) -> int:
        """One counter or gauge by exact name; 0 while Envoy has not created it."""
        return (await self.stats(name)).get(name, 0)

    async def handshakes_to_server(self) -> int:
        """TLS handshakes of this Envoy's cluster towards `server`, with or without a
        transport socket match (Envoy then counts under `cluster.NAME;.ssl.`)."""
        stats = await self.stats(f"cluster.{SERVER_CLUSTER}")
        return sum(
            v
            for k, v in stats.items()
            if k.endswith(".ssl.handshake")
            and k.split(".ssl.")[0].rstrip(";.") == f"cluster.{SERVER_CLUSTER}"
        )

    async def handshakes_in(self, port: int = SERVER_PORT) -> int:
        """TLS handshakes on this Envoy's bound inbound listener on `port`."""
        return await self.stat(f"listener.{self.ip}_{port}.ssl.handshake")

    async def config_dump(self, resource: str, *, include_eds: bool = False) -> list[Any]:
        path = f"/config_dump?resource={resource}" + ("&include_eds" if include_eds else "")
        return list((await self.admin.get(path)).get("configs", []))


def _re_escape(text: str) -> str:
    return "".join(f"\\{c}" if c in ".|()[]{}*+?^$\\" else c for c in text)


@dataclass
class SecureMesh:
    processes: ProcessTracker
    cp: SecureControlPlane
    server: Workload
    app: DemoServer  # the server's application: records every request it gets
    clients: dict[str, Workload] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # by `converge`

    # configuration

    def write(self, name: str, text: str) -> None:
        """Write a config file atomically, as kubectl-like tools do."""
        path = self.cp.config_dir / name
        tmp = path.with_suffix(".tmp~")
        tmp.write_text(text)
        tmp.rename(path)

    def remove(self, *names: str) -> None:
        for name in names:
            (self.cp.config_dir / name).unlink(missing_ok=True)

    # traffic

    async def call(
        self,
        client: str = "client",
        path: str = "/",
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,  # noqa: ASYNC109 - one deadline per request
    ) -> HttpResult:
        """A request from a client app through its sidecar's egress listener to `server`."""
        w = self.clients[client]
        sent = {"Host": f"server:{SERVER_PORT}", **(headers or {})}
        url = f"http://{w.egress_ip}:{SERVER_PORT}{path}"
        return await http_request(method, url, headers=sent, timeout=timeout, source_ip=w.ip)

    async def plaintext(
        self, path: str = "/", port: int = SERVER_PORT, headers: Mapping[str, str] | None = None
    ) -> HttpResult:
        """A plaintext request straight to the server sidecar's inbound listener."""
        url = f"http://{self.server.ip}:{port}{path}"
        return await http_get(url, headers=headers, timeout=3)

    async def plaintext_refused(self, port: int = SERVER_PORT) -> bytes | None:
        """Send a plaintext HTTP request on a raw socket to the inbound listener: what came
        back if it was refused (closed or reset without an HTTP response), else None."""
        return await raw_exchange(self.server.ip, port, _http_request_bytes())

    async def tls_without_client_cert_refused(self, port: int = SERVER_PORT) -> str | None:
        """TLS (ALPN `istio`, server verified against the root) without a client
        certificate: the error if no HTTP response came back, else None."""
        ctx = ssl.create_default_context(cafile=str(self.cp.root_cert))
        ctx.check_hostname = False  # workload certificates carry a URI SAN only
        ctx.set_alpn_protocols(["istio"])
        try:
            async with asyncio.timeout(3):
                reader, writer = await asyncio.open_connection(
                    self.server.ip, port, ssl=ctx, server_hostname=SERVER_SNI
                )
                try:
                    writer.write(_http_request_bytes())
                    await writer.drain()
                    data = await reader.read(64)
                finally:
                    writer.close()
        except (ssl.SSLError, ConnectionError) as e:
            return repr(e)
        return None if data.startswith(b"HTTP/") else f"answered {data!r}"

    # xDS

    async def syncz(self) -> dict[str, dict[str, Any]]:
        resp = await http_get(f"http://{self.cp.monitoring_address}/debug/syncz", timeout=5)
        assert resp.status == 200, resp.text
        return {e["proxy"]: e for e in resp.json()}

    async def control_plane_dump(self, workload: Workload) -> dict[str, Any]:
        url = f"http://{self.cp.monitoring_address}/debug/config_dump?proxyID={workload.node_id}"
        resp = await http_get(url, timeout=5)
        assert resp.status == 200, resp.text
        return dict(resp.json())

    def workloads(self) -> list[Workload]:
        return [self.server, *self.clients.values()]

    async def converge(
        self,
        what: str,
        predicate: Callable[[], Awaitable[object]],
        timeout: float = 10.0,  # noqa: ASYNC109 - a deadline per config change
    ) -> float:
        """Wait until `predicate` holds after a config change; returns the seconds it took.
        On timeout the failure says whether every proxy ACKed its config and how the
        server's Envoy is draining the connections of replaced filter chains."""
        t0 = time.monotonic()
        try:
            await wait_for(predicate, timeout, interval=0.1, message=what)
        except pytest.fail.Exception as e:
            raise AssertionError(f"{e}\n{await self.diagnose()}") from None
        took = time.monotonic() - t0
        self.timings[what] = took
        return took

    async def diagnose(self) -> str:
        lines = []
        with contextlib.suppress(Exception):
            syncz = await self.syncz()
            for w in self.workloads():
                entry = syncz.get(w.node_id, {})
                acked = all(entry.get(f"{t}_sent") == entry.get(f"{t}_acked") for t in SYNCZ_TYPES)
                lines.append(f"{w.name}: all xDS types ACKed: {acked}")
        with contextlib.suppress(Exception):
            stats = await self.server.stats("drain")
            stats.update(await self.server.stats("downstream_cx_active"))
            lines += [f"server {k}: {v}" for k, v in sorted(stats.items()) if v]
        return "\n".join(lines)


def _http_request_bytes(path: str = "/") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n".encode()


async def raw_exchange(host: str, port: int, data: bytes) -> bytes | None:
    """Send `data`; what came back before the peer closed, or None if it was an HTTP
    response. A timeout raises (a hang is not a refusal)."""
    async with asyncio.timeout(3):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(data)
            await writer.drain()
            try:
                answer = await reader.read()
            except ConnectionResetError:
                answer = b""
        finally:
            writer.close()
    return None if answer.startswith(b"HTTP/") else answer


async def start_secure_mesh(
    processes: ProcessTracker,
    tmp_path: Path,
    short_dir: Path,
    *,
    clients: Mapping[str, str],
    cert_ttl: str = "1h",
    extra_config: Mapping[str, str] | None = None,
) -> SecureMesh:
    """CA + control plane, the server app and its sidecar, and one sidecar per client
    (`clients`: app name -> service account); every Envoy LIVE on return."""
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    server_ip, server_egress = unique_loopback_ip(), unique_loopback_ip()
    files = server_config(server_ip, server_egress)
    addresses = {app: (unique_loopback_ip(), unique_loopback_ip()) for app in clients}
    for app, (_, egress) in addresses.items():
        files[f"{app}-sidecar.yaml"] = client_sidecar_yaml(app, egress)
    files.update(extra_config or {})
    for name, text in files.items():
        (config_dir / name).write_text(text)
    cp = await start_secure_control_plane(processes, tmp_path, config_dir=config_dir)
    app = await processes.demo_http(server_ip, APP_PORT, service="server")

    async def workload(app_name: str, sa: str, ip: str, egress: str) -> Workload:
        agent = await start_agent(
            processes,
            cp,
            short_dir / app_name,
            name=f"{app_name}-1",
            service_account=sa,
            ip=ip,
            labels={"app": app_name},
            cert_ttl=cert_ttl,
        )
        return Workload(f"{app_name}-1", app_name, sa, ip, egress, agent)

    started = await asyncio.gather(
        workload("server", "server", server_ip, server_egress),
        *(workload(a, sa, *addresses[a]) for a, sa in clients.items()),
    )
    await asyncio.gather(*(w.admin.wait_live() for w in started))
    return SecureMesh(processes, cp, started[0], app, {w.app: w for w in started[1:]})


# --- TLS configuration as Envoy holds it -------------------------------------------------


async def upstream_tls_to_server(client: Workload) -> dict[str, Any] | None:
    """The UpstreamTlsContext (JSON) that `client`'s Envoy uses towards the server's
    endpoint, or None for plaintext: the cluster's `transport_socket_matches` applied to
    the endpoint's EDS metadata (Istio's auto mTLS), else its `transport_socket`."""
    clusters = await client.config_dump("dynamic_active_clusters")
    (cluster,) = [c["cluster"] for c in clusters if c["cluster"]["name"] == SERVER_CLUSTER]
    metadata: dict[str, Any] = {}
    for cfg in await client.config_dump("dynamic_endpoint_configs", include_eds=True):
        ep_cfg = cfg.get("endpoint_config", {})
        if ep_cfg.get("cluster_name") != SERVER_CLUSTER:
            continue
        for locality in ep_cfg.get("endpoints", []):
            for lb in locality.get("lb_endpoints", []):
                meta = lb.get("metadata", {}).get("filter_metadata", {})
                metadata = meta.get("envoy.transport_socket_match", {})
    socket = cluster.get("transport_socket")
    for match in cluster.get("transport_socket_matches", []):
        if all(metadata.get(k) == v for k, v in match.get("match", {}).items()):
            socket = match.get("transport_socket")
            break
    if not socket or socket.get("name") != TLS_SOCKET:
        return None
    return dict(socket["typed_config"])


async def inbound_chains(server: Workload, port: int = SERVER_PORT) -> list[dict[str, Any]]:
    """The filter chains of the server sidecar's bound inbound listener on `port`."""
    for cfg in await server.config_dump("dynamic_listeners"):
        listener = cfg.get("active_state", {}).get("listener", {})
        sock = listener.get("address", {}).get("socket_address", {})
        if sock.get("address") == server.ip and sock.get("port_value") == port:
            return list(listener.get("filter_chains", []))
    raise LookupError(f"no active inbound listener on {server.ip}:{port}")


def chain_is_mtls(chain: Mapping[str, Any]) -> bool:
    """A filter chain that terminates TLS and requires a client certificate."""
    socket = chain.get("transport_socket", {})
    if socket.get("name") != TLS_SOCKET:
        return False
    return bool(socket["typed_config"].get("require_client_certificate"))


def as_text(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


# --- a test identity of our own (the agents' keys never leave their workdirs) ------------


async def issue_identity(
    cp: SecureControlPlane, directory: Path, service_account: str, validity_s: int = 3600
) -> tuple[Path, Path]:
    """A workload certificate for `service_account` from the real CA (token from the real
    `meshpilot token create`, CSR over the secure port): (cert chain file, key file)."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    token_file = await cp.write_token(directory / "token", NAMESPACE, service_account)
    token = (await asyncio.to_thread(token_file.read_text)).strip()
    key = ec.generate_private_key(ec.SECP256R1())
    creds = grpc.ssl_channel_credentials(cp.root_cert.read_bytes())
    opts = [("grpc.ssl_target_name_override", ISTIOD_SAN)]
    async with grpc.aio.secure_channel(cp.secure_address, creds, options=opts) as channel:
        stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(channel)
        resp = await stub.CreateCertificate(
            istio_ca_pb2.IstioCertificateRequest(
                csr=csr_pem(key, uri=spiffe(service_account)), validity_duration=validity_s
            ),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    return await asyncio.to_thread(_write_identity, directory, "".join(resp.cert_chain), key)


def _write_identity(
    directory: Path, chain: str, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_file, key_file = directory / "cert-chain.pem", directory / "key.pem"
    cert_file.write_text(chain)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


@dataclass
class ServedChain:
    """What `openssl s_client -showcerts` saw: the PEM chain and s_client's own verdict."""

    pems: list[str]
    verify_line: str
    output: str


async def s_client(
    host: str,
    port: int,
    *,
    root: Path,
    cert: Path,
    key: Path,
    alpn: str = "istio",
    servername: str = SERVER_SNI,
) -> ServedChain:
    """`openssl s_client -showcerts` with a client certificate (the server requires one)."""
    argv = [openssl_binary(), "s_client", "-connect", f"{host}:{port}", "-showcerts"]
    argv += ["-CAfile", str(root), "-cert", str(cert), "-key", str(key)]
    argv += ["-alpn", alpn, "-servername", servername, "-verify_return_error"]
    done = await asyncio.to_thread(
        subprocess.run, argv, input=b"", capture_output=True, timeout=15, check=False
    )
    out = done.stdout.decode(errors="replace")
    err = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"s_client failed ({done.returncode}):\n{out}\n{err}"
    pems, current = [], None
    for line in out.splitlines():
        if line.startswith("-----BEGIN CERTIFICATE-----"):
            current = [line]
        elif current is not None:
            current.append(line)
            if line.startswith("-----END CERTIFICATE-----"):
                pems.append("\n".join(current) + "\n")
                current = None
    verify = [ln.strip() for ln in out.splitlines() if "Verify return code" in ln]
    assert pems, f"s_client showed no certificate:\n{out}\n{err}"
    return ServedChain(pems, verify[-1] if verify else "", out)
