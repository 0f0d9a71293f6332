"""`meshpilot serve --kubeconfig` as a real process against the API server emulator.

Readiness after the first sync, cluster objects in /debug/configz, a CSR authenticated
by a ServiceAccount token, the root certificate ConfigMap and the webhook caBundle
written by the leader only, leadership moving to the other replica when the leader is
killed, and the injection webhook answering over HTTPS with a certificate of the mesh
root. Every serve process is stopped by its pid.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from cryptography import x509

from meshpilot.ca.identity import SpiffeId
from meshpilot.kube.leader import NAMESPACE_CONTROLLER
from meshpilot.protos import istio_ca_pb2, istio_ca_pb2_grpc
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings
from tests.e2e.harness import ManagedProcess, free_port, unique_loopback_ip
from tests.kube.apiserver import ApiServer
from tests.kube.helpers import NET, vs
from tests.unit.ca._helpers import csr_pem

SYSTEM = "istio-system"
ROOT_CONFIGMAP = "istio-ca-root-cert"
SERVER_NAME = "istiod.istio-system.svc"
# Short enough that a takeover happens within a test, long enough that a loaded machine
# renews in time: renewals due within 3 s, tried every 1.5 s.
LEASE = 6.0


@dataclass
class Serve:
    proc: ManagedProcess
    ip: str
    monitoring: int
    secure: int
    injection: int

    async def get(self, path: str) -> tuple[int, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"http://{self.ip}:{self.monitoring}{path}") as resp,
        ):
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def configz(self) -> dict[str, Any]:
        status, body = await self.get("/debug/configz")
        assert status == 200, body
        assert isinstance(body, dict)
        return body

    async def status_or_none(self, path: str) -> int | None:
        if not self.proc.running:
            pytest.fail(self.proc.describe_exit(), pytrace=False)
        try:
            return (await self.get(path))[0]
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None


@pytest.fixture
async def serves(tmp_path: Path) -> AsyncIterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for s in started:
        await s.proc.stop()


async def start_serve(
    serves: list[Serve], kubeconfig: Path, tmp_path: Path, *extra: str, wait_ready: bool = True
) -> Serve:
    ip = unique_loopback_ip()
    mon, secure, inj = free_port(ip), free_port(ip), free_port(ip)
    n = len(serves)
    argv = [
        sys.executable, "-m", "meshpilot", "serve",
        "--kubeconfig", str(kubeconfig),
        "--xds-address", f"{ip}:0",
        "--monitoring-address", f"{ip}:{mon}",
        "--secure-xds-address", f"{ip}:{secure}",
        "--injection-address", f"{ip}:{inj}",
        "--lease-duration", f"{LEASE:g}s",
        "--debounce-after", "10ms",
        *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPILOT_")}
    env["POD_NAME"] = f"meshpilot-{n}"
    proc = ManagedProcess(argv, log_path=tmp_path / f"serve-{n}.log", env=env, name=f"serve-{n}")
    serve = Serve(proc.start(), ip, mon, secure, inj)
    serves.append(serve)
    if wait_ready:
        await until(lambda: _is(serve.status_or_none("/ready"), 200), 60, f"{proc.name} ready")
    return serve


async def _is(status: Awaitable[int | None], want: int) -> bool:
    return await status == want


async def until(
    cond: Callable[[], Awaitable[bool] | bool], limit: float = 20.0, what: str = ""
) -> None:
    """Poll `cond` (sync or async) until true, for at most `limit` seconds."""
    deadline = time.monotonic() + limit
    while True:
        result = cond()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit:g}s waiting for {what or cond}")
        await asyncio.sleep(0.1)


def root_configmap(apiserver: ApiServer, ns: str) -> str | None:
    cm = apiserver.get("", "v1", "configmaps", ns, ROOT_CONFIGMAP)
    return None if cm is None else (cm.get("data") or {}).get("root-cert.pem")


def secret_root(apiserver: ApiServer) -> str:
    secret = apiserver.get("", "v1", "secrets", SYSTEM, "istio-ca-secret")
    assert secret is not None, "the CA did not create istio-ca-secret"
    return base64.b64decode(secret["data"]["ca-cert.pem"]).decode()


def namespace(apiserver: ApiServer, name: str) -> None:
    apiserver.create("", "v1", "namespaces", {"metadata": {"name": name}})


# --- readiness --------------------------------------------------------------------------


async def test_ready_only_after_the_first_sync(
    apiserver: ApiServer, kubeconfig: Path, tmp_path: Path, serves: list[Serve]
) -> None:
    # Every API request takes a while: the first sync (several rounds of lists and
    # discovery) takes seconds, while the monitoring port answers at once.
    apiserver.delay = 0.4
    serve = await start_serve(serves, kubeconfig, tmp_path, wait_ready=False)
    await until(lambda: _answers(serve), 30, "the monitoring port")
    seen: list[int | None] = []
    while (status := await serve.status_or_none("/ready")) != 200:
        seen.append(status)
        assert len(seen) < 600, "never ready"
        await asyncio.sleep(0.1)
    assert 503 in seen, f"/ready answered {seen} before 200"
    kube = (await serve.configz())["kubernetes"]
    assert kube["synced"] is True
    assert kube["connected"] is True
    assert kube["clusterID"] == "Kubernetes"


async def _answers(serve: Serve) -> bool:
    return await serve.status_or_none("/ready") is not None


# --- one replica ------------------------------------------------------------------------


async def test_cluster_objects_show_in_configz(
    apiserver: ApiServer, kubeconfig: Path, tmp_path: Path, serves: list[Serve]
) -> None:
    serve = await start_serve(serves, kubeconfig, tmp_path)
    namespace(apiserver, "shop")
    apiserver.create(
        "",
        "v1",
        "services",
        {
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80}]},
        },
    )
    apiserver.create(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        {
            "metadata": {
                "name": "web-abc",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.5"], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    )
    apiserver.create(
        NET,
        "v1",
        "virtualservices",
        {**vs("web"), "metadata": {"name": "web", "namespace": "shop"}},
    )
    wanted = {
        ("Service", "web", "Service shop/web (Kubernetes)"),
        ("EndpointSlice", "web-abc", "EndpointSlice shop/web-abc (Kubernetes)"),
        ("VirtualService", "web", "VirtualService shop/web (Kubernetes)"),
    }

    async def all_there() -> bool:
        body = await serve.configz()
        objects = body["objects"]
        have = {(o["kind"], o["name"], o["origin"]) for o in objects if o["namespace"] == "shop"}
        # ...and pushed: the Service is in the push context.
        return wanted <= have and "web.shop.svc.cluster.local" in body["services"]

    await until(all_there, 20, "the Service, EndpointSlice and VirtualService in configz")
    kube = (await serve.configz())["kubernetes"]
    assert kube["leader"]["leading"] is True
    assert all(i["connected"] for i in kube["informers"])


async def create_certificate(serve: Serve, root: str, token: str, ident: SpiffeId) -> list[str]:
    """A CSR for `ident` over the secure port, with `token`; the chain, leaf checked."""
    creds = grpc.ssl_channel_credentials(root.encode())
    opts = [("grpc.ssl_target_name_override", SERVER_NAME)]
    async with grpc.aio.secure_channel(f"{serve.ip}:{serve.secure}", creds, options=opts) as ch:
        stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(ch)
        req = istio_ca_pb2.IstioCertificateRequest(csr=csr_pem(uri=str(ident)))
        resp = await stub.CreateCertificate(
            req, metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
    chain = list(resp.cert_chain)
    leaf = x509.load_pem_x509_certificate(chain[0].encode())
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [str(ident)]
    issuer = x509.load_pem_x509_certificate(root.encode())
    leaf.verify_directly_issued_by(issuer)
    return chain


async def test_a_service_account_token_gets_a_certificate(
    apiserver: ApiServer, kubeconfig: Path, tmp_path: Path, serves: list[Serve]
) -> None:
    serve = await start_serve(serves, kubeconfig, tmp_path)
    token = apiserver.add_service_account_token("default", "sleep", ["istio-ca"])
    ident = SpiffeId("cluster.local", "default", "sleep")
    root = secret_root(apiserver)
    await create_certificate(serve, root, token, ident)
    assert apiserver.requests[("create", "tokenreviews")] == 1
    # A token the cluster does not know is refused.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await create_certificate(serve, root, "not-a-token", ident)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Nor may a real token ask for another identity.
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await create_certificate(serve, root, token, SpiffeId("cluster.local", "default", "x"))
    assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_the_leader_publishes_the_root_and_the_webhook_ca_bundle(
    apiserver: ApiServer, kubeconfig: Path, tmp_path: Path, serves: list[Serve]
) -> None:
    apiserver.create(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        {
            "metadata": {"name": "istio-sidecar-injector"},
            "webhooks": [
                {
                    "name": "sidecar-injector.istio.io",
                    "clientConfig": {
                        "service": {"name": "istiod", "namespace": SYSTEM, "path": "/inject"}
                    },
                    "sideEffects": "None",
                    "admissionReviewVersions": ["v1"],
                }
            ],
        },
    )
    await start_serve(serves, kubeconfig, tmp_path)
    root = secret_root(apiserver)
    await until(lambda: root_configmap(apiserver, "default") == root, 20, "the root ConfigMap")
    namespace(apiserver, "bookinfo")
    await until(lambda: root_configmap(apiserver, "bookinfo") == root, 20, "a new namespace's")
    assert root_configmap(apiserver, "kube-system") is None

    def bundle() -> str | None:
        cfg = apiserver.get(
            "admissionregistration.k8s.io",
            "v1",
            "mutatingwebhookconfigurations",
            "",
            "istio-sidecar-injector",
        )
        assert cfg is not None
        return cfg["webhooks"][0]["clientConfig"].get("caBundle")

    await until(lambda: bundle() == base64.b64encode(root.encode()).decode(), 20, "caBundle")


async def test_the_injection_webhook_answers_over_https_with_a_mesh_certificate(
    apiserver: ApiServer, kubeconfig: Path, tmp_path: Path, serves: list[Serve]
) -> None:
    serve = await start_serve(serves, kubeconfig, tmp_path)
    ctx = ssl.create_default_context(cadata=secret_root(apiserver))
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0df28fbd-5f5f-11e8-bc74-36e6bb280816",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default",
            "operation": "CREATE",
            "object": {
                "metadata": {"name": "sleep-1", "namespace": "default", "labels": {"app": "s"}},
                "spec": {"containers": [{"name": "sleep", "image": "curl"}]},
            },
        },
    }
    connector = aiohttp.TCPConnector(ssl=ctx, force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(
            f"https://{serve.ip}:{serve.injection}/inject",
            json=review,
            # The name the API server checks: the Service's.
            server_hostname=SERVER_NAME,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp,
    ):
        assert resp.status == 200
        answer = await resp.json()
    response = answer["response"]
    assert response["uid"] == review["request"]["uid"]  # type: ignore[index]
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    patch = json.loads(base64.b64decode(response["patch"]))
    added = [op["value"] for op in patch if op["path"].startswith("/spec/containers")]
    assert any(c.get("name") == "istio-proxy" for c in added if isinstance(c, dict))


# --- two replicas -----------------------------------------------------------------------


async def test_only_the_leader_writes_and_the_other_takes_over_when_it_is_killed(
    apiserver: ApiServer, kubeconfig: Path, tmp_path: Path, serves: list[Serve]
) -> None:
    first = await start_serve(serves, kubeconfig, tmp_path)
    await until(lambda: _leading(first), 20, "the first replica to lead")
    second = await start_serve(serves, kubeconfig, tmp_path)
    root = secret_root(apiserver)
    await until(lambda: root_configmap(apiserver, "default") == root, 20, "the root ConfigMap")
    assert (await second.configz())["kubernetes"]["leader"]["leading"] is False
    # A follower serves the CA too, with the root the first replica created.
    token = apiserver.add_service_account_token("default", "sleep", ["istio-ca"])
    await create_certificate(second, root, token, SpiffeId("cluster.local", "default", "sleep"))

    creates = apiserver.requests[("create", "configmaps")]
    namespace(apiserver, "one")
    await until(lambda: root_configmap(apiserver, "one") == root, 20, "namespace one's")
    # Give a second writer time to show itself, then count: one create, by the leader.
    await asyncio.sleep(1.0)
    assert apiserver.requests[("create", "configmaps")] == creates + 1
    assert (await second.configz())["kubernetes"]["leader"]["leading"] is False

    os.kill(first.proc.pid, signal.SIGKILL)
    # The follower waits a whole lease duration from when it last saw the record change,
    # then takes it at its next try: within LEASE plus a retry period or two.
    await until(lambda: _leading(second), 3 * LEASE, "the second replica to take over")
    namespace(apiserver, "two")
    await until(lambda: root_configmap(apiserver, "two") == root, 20, "namespace two's")


async def _leading(serve: Serve) -> bool:
    return bool((await serve.configz())["kubernetes"]["leader"]["leading"])


async def test_a_stopped_leader_releases_the_lease_and_exits_cleanly(
    apiserver: ApiServer, kubeconfig: Path, tmp_path: Path, serves: list[Serve]
) -> None:
    serve = await start_serve(serves, kubeconfig, tmp_path)
    await until(lambda: _leading(serve), 20, "the replica to lead")
    assert await serve.proc.stop(timeout=15) == 0, serve.proc.log_tail()
    lease = apiserver.get("coordination.k8s.io", "v1", "leases", SYSTEM, NAMESPACE_CONTROLLER)
    assert lease is not None
    # Released as client-go does: no holder, so the next replica need not wait.
    assert not lease["spec"].get("holderIdentity")


async def test_a_signal_during_the_first_sync_ends_serve(
    apiserver: ApiServer, kubeconfig: Path, tmp_path: Path, serves: list[Serve]
) -> None:
    await apiserver.stop()  # unreachable: serve waits for its first sync
    serve = await start_serve(serves, kubeconfig, tmp_path, wait_ready=False)
    await until(lambda: _answers(serve), 30, "the monitoring port")
    assert await serve.status_or_none("/ready") == 503

    async def outage_shown() -> bool:
        kube = (await serve.configz())["kubernetes"]
        return kube["connected"] is False and any(i["lastError"] for i in kube["informers"])

    await until(outage_shown, 20, "/debug/configz to show the unreachable API server")
    assert await serve.proc.stop(timeout=15) == 0, serve.proc.log_tail()


# --- in process: the mesh ConfigMap, live ------------------------------------------------


async def test_the_istio_configmap_is_the_mesh_config_and_is_applied_live(
    apiserver: ApiServer, kubeconfig: Path
) -> None:
    def mesh(text: str) -> dict[str, Any]:
        return {"metadata": {"name": "istio", "namespace": SYSTEM}, "data": {"mesh": text}}

    apiserver.create("", "v1", "configmaps", mesh("trustDomain: example.org\n"))
    ip = unique_loopback_ip()
    settings = Settings(
        kubeconfig=kubeconfig,
        xds_address=f"{ip}:0",
        monitoring_address=f"{ip}:0",
        secure_xds_address=f"{ip}:0",
        injection_address=f"{ip}:0",
        lease_duration=LEASE,
    )
    server = MeshServer(settings)
    await server.start()
    try:
        assert server.mesh.trust_domain == "example.org"
        assert server.secure.ca.trust_domain == "example.org"
        version = server.pusher.current.version if server.pusher.current else ""
        current = apiserver.get("", "v1", "configmaps", SYSTEM, "istio")
        assert current is not None
        current["data"]["mesh"] = "trustDomain: example.org\nenableAutoMtls: false\n"
        apiserver.rest.update(
            apiserver._rt("", "v1", "configmaps"), "v1", SYSTEM, "istio", current, ""
        )
        await until(lambda: server.mesh.enable_auto_mtls is False, 10, "the new mesh config")
        await until(
            lambda: server.pusher.current is not None and server.pusher.current.version != version,
            10,
            "a push with it",
        )
    finally:
        await server.stop()


async def test_with_a_ca_dir_the_secrets_are_not_read(
    apiserver: ApiServer, kubeconfig: Path, tmp_path: Path
) -> None:
    ip = unique_loopback_ip()
    settings = Settings(
        kubeconfig=kubeconfig,
        ca_dir=tmp_path / "ca",
        xds_address=f"{ip}:0",
        monitoring_address=f"{ip}:0",
        secure_xds_address=f"{ip}:0",
        injection_address=f"{ip}:0",
        lease_duration=LEASE,
    )
    server = MeshServer(settings)
    await server.start()
    try:
        assert server.secure.ca.ca_dir is not None
        root = (tmp_path / "ca" / "root-cert.pem").read_text()
        assert server.secure.ca.root_cert_pem == root
        await until(lambda: root_configmap(apiserver, "default") == root, 20, "the root ConfigMap")
        assert not [k for k in apiserver.requests if k[1] == "secrets"]
    finally:
        await server.stop()
