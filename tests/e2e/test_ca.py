"""The CA with a plug-in root, hostile CSRs, and the secure port (15012) end to end.

`meshpilot serve --ca-dir` runs as a real process; clients speak gRPC over real TLS
with real X.509 material: Istio's plug-in sample CA, tokens minted by the
`meshpilot token create` command, CSRs of every hostile kind.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from prometheus_client.parser import text_string_to_metric_families

from meshpilot.ca.tokens import TokenSigner
from meshpilot.protos import istio_ca_pb2, istio_ca_pb2_grpc
from meshpilot.xds import typeurls
from tests.e2e.harness import ProcessTracker, free_port, http_get, port_open, unique_loopback_ip
from tests.unit.ca._helpers import (
    SLEEP,
    copy_plugin_dir,
    csr_pem,
    load_chain,
    openssl_verify,
    tamper_signature,
    verify_with_cryptography,
)

SERVER_NAME = "istiod.istio-system.svc"
NODE_SLEEP = "sidecar~127.0.0.1~sleep-1.default~default.svc.cluster.local"
Code = grpc.StatusCode
GARBAGE_PEM = "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n"


@dataclass
class Serve:
    ip: str
    secure_port: int
    monitoring_port: int
    ca_dir: Path

    @property
    def secure_address(self) -> str:
        return f"{self.ip}:{self.secure_port}"

    @property
    def root(self) -> bytes:
        return (self.ca_dir / "root-cert.pem").read_bytes()

    def channel(self, cert: tuple[bytes, bytes] | None = None) -> grpc.aio.Channel:
        key, chain = cert if cert is not None else (None, None)
        creds = grpc.ssl_channel_credentials(self.root, private_key=key, certificate_chain=chain)
        opts = [("grpc.ssl_target_name_override", SERVER_NAME), ("grpc.enable_retries", 0)]
        return grpc.aio.secure_channel(self.secure_address, creds, options=opts)

    async def metrics(self) -> dict[str, float]:
        resp = await http_get(f"http://{self.ip}:{self.monitoring_port}/metrics", timeout=5)
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(resp.text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out


async def start_serve(processes: ProcessTracker, ca_dir: Path, *extra: str) -> Serve:
    ip = unique_loopback_ip()
    secure, xds, mon = free_port(ip), free_port(ip), free_port(ip)
    argv = [
        sys.executable, "-m", "meshpilot", "serve",
        "--ca-dir", str(ca_dir),
        "--xds-address", f"{ip}:{xds}",
        "--secure-xds-address", f"{ip}:{secure}",
        "--monitoring-address", f"{ip}:{mon}",
        *extra,
    ]  # fmt: skip
    await processes.spawn(
        argv, ready_line=None, ready=lambda: port_open(ip, secure), timeout=30, name="serve"
    )
    return Serve(ip, secure, mon, ca_dir)


def mint_token(ca_dir: Path, namespace: str = "default", sa: str = "sleep") -> str:
    """A token from the real CLI command."""
    done = subprocess.run(
        [sys.executable, "-m", "meshpilot", "token", "create", "--ca-dir", str(ca_dir),
         "--namespace", namespace, "--service-account", sa, "--ttl", "1h"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    return done.stdout.strip()


async def create_certificate(
    serve: Serve,
    csr: str,
    token: str | None,
    *,
    validity: int = 0,
    cert: tuple[bytes, bytes] | None = None,
) -> list[str]:
    async with serve.channel(cert) as ch:
        stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(ch)
        meta = (("authorization", f"Bearer {token}"),) if token else None
        req = istio_ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=validity)
        resp = await stub.CreateCertificate(req, metadata=meta, timeout=10)
    return list(resp.cert_chain)


async def expect_refusal(coro: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro  # type: ignore[misc]
    assert e.value.code() == code, f"{e.value.code()}: {e.value.details()}"
    return e.value.details() or ""


def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture
async def plugin_serve(processes: ProcessTracker, tmp_path: Path) -> AsyncIterator[Serve]:
    yield await start_serve(processes, copy_plugin_dir(tmp_path / "plugin-ca"))


# --- plug-in CA -------------------------------------------------------------------------


async def test_plugin_ca_chains_verify_through_ca_cert(plugin_serve: Serve, tmp_path: Path) -> None:
    serve = plugin_serve
    token = mint_token(serve.ca_dir)
    for key in (ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)):
        pems = await create_certificate(serve, csr_pem(key), token)
        assert len(pems) == 2
        assert pems[1].strip() == (serve.ca_dir / "ca-cert.pem").read_text().strip()
        out = openssl_verify(
            tmp_path, serve.ca_dir / "root-cert.pem", pems[0], serve.ca_dir / "ca-cert.pem"
        )
        assert out.strip().endswith(": OK")
        roots = x509.load_pem_x509_certificates(serve.root)
        assert verify_with_cryptography(load_chain(pems), roots, strict=False) == [
            x509.UniformResourceIdentifier(str(SLEEP))
        ]
        leaf = load_chain(pems)[0]
        assert leaf.public_key() == key.public_key()
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert 86400 <= lifetime.total_seconds() <= 86400 + 120  # default 24h (+ backdating)


async def test_secure_port_serves_a_certificate_from_the_ca(plugin_serve: Serve) -> None:
    serve = plugin_serve
    ctx = ssl.create_default_context(cadata=serve.root.decode())
    ctx.set_alpn_protocols(["h2"])
    for name in (SERVER_NAME, "istiod.istio-system.svc.cluster.local", "localhost"):
        _, writer = await asyncio.open_connection(
            serve.ip, serve.secure_port, ssl=ctx, server_hostname=name
        )
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj.selected_alpn_protocol() == "h2"
        der = sslobj.getpeercert(binary_form=True)
        writer.close()
    cert = x509.load_der_x509_certificate(der)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address(serve.ip) in san.get_values_for_type(x509.IPAddress)


# --- hostile CSRs -------------------------------------------------------------------


async def test_hostile_csrs_are_refused_counted_and_the_ca_keeps_serving(
    plugin_serve: Serve, tmp_path: Path
) -> None:
    serve = plugin_serve
    token = mint_token(serve.ca_dir)
    signer = TokenSigner.from_ca_dir(serve.ca_dir, create=False)
    expired = signer.create("default", "sleep", 60, now=time.time() - 3600)
    foreign = TokenSigner.from_ca_dir(tmp_path / "another-ca").create("default", "sleep", 3600)
    good = csr_pem()
    weak = rsa.generate_private_key(65537, 1024)
    foreign_id = csr_pem(uri="spiffe://cluster.local/ns/kube-system/sa/admin")
    extra_dns = csr_pem(
        sans=[x509.UniformResourceIdentifier(str(SLEEP)), x509.DNSName("reviews.default.svc")]
    )
    second_uri = csr_pem(
        sans=[
            x509.UniformResourceIdentifier(str(SLEEP)),
            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/admin"),
        ]
    )
    cases: list[tuple[str, str, str | None, int, grpc.StatusCode]] = [
        ("missing token", good, None, 0, Code.UNAUTHENTICATED),
        ("expired token", good, expired, 0, Code.UNAUTHENTICATED),
        ("foreign token", good, foreign, 0, Code.UNAUTHENTICATED),
        ("garbage token", good, "not-a-token", 0, Code.UNAUTHENTICATED),
        ("foreign SPIFFE ID", foreign_id, token, 0, Code.PERMISSION_DENIED),
        ("extra DNS SAN", extra_dns, token, 0, Code.PERMISSION_DENIED),
        ("second URI SAN", second_uri, token, 0, Code.PERMISSION_DENIED),
        ("CA:true", csr_pem(ca=True), token, 0, Code.INVALID_ARGUMENT),
        ("RSA 1024", csr_pem(weak), token, 0, Code.INVALID_ARGUMENT),
        ("garbage PEM", GARBAGE_PEM, token, 0, Code.INVALID_ARGUMENT),
        ("bad signature", tamper_signature(good), token, 0, Code.INVALID_ARGUMENT),
        ("oversized", "A" * (100 * 1024), token, 0, Code.RESOURCE_EXHAUSTED),
        ("oversized 5 MiB", "A" * (5 * 1024 * 1024), token, 0, Code.RESOURCE_EXHAUSTED),
        ("validity above max", good, token, 91 * 86400, Code.INVALID_ARGUMENT),
        ("negative validity", good, token, -1, Code.INVALID_ARGUMENT),
    ]  # fmt: skip
    before = await serve.metrics()
    for name, csr, tok, validity, code in cases:
        details = await expect_refusal(create_certificate(serve, csr, tok, validity=validity), code)
        # Refusals never echo credentials.
        assert token not in details and expired not in details and foreign not in details, name
        # ... and the CA keeps serving.
        assert len(await create_certificate(serve, good, token)) == 2, name

    # A request that is not even a protobuf message.
    async with serve.channel() as ch:
        raw = ch.unary_unary(
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        await expect_refusal(raw(b"\xff\xff\xff", timeout=10), Code.INVALID_ARGUMENT)

    after = await serve.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    refusals = len(cases) + 1
    assert delta("citadel_server_csr_count_total") == refusals + len(cases)
    assert delta("citadel_server_success_cert_issuance_count_total") == len(cases)
    assert delta("citadel_server_authentication_failure_count_total") == 4
    # CA:true, RSA 1024, garbage PEM, bad signature, non-protobuf request.
    assert delta("citadel_server_csr_parsing_err_count_total") == 5
    assert delta("citadel_server_csr_sign_err_count_total{error=TTL_ERROR}") == 2
    refused = {
        k: after[k] - before.get(k, 0.0)
        for k in after
        if k.startswith("meshpilot_ca_csr_refused_total")
    }
    assert sum(refused.values()) == refusals
    for key, count in {
        "code=UNAUTHENTICATED,reason=unauthenticated": 4,
        "code=PERMISSION_DENIED,reason=foreign_identity": 1,
        "code=PERMISSION_DENIED,reason=extra_san": 2,
        "code=INVALID_ARGUMENT,reason=ca": 1,
        "code=INVALID_ARGUMENT,reason=weak_key": 1,
        "code=INVALID_ARGUMENT,reason=pem": 1,
        "code=INVALID_ARGUMENT,reason=signature": 1,
        "code=RESOURCE_EXHAUSTED,reason=oversized": 2,
        "code=INVALID_ARGUMENT,reason=ttl_too_long": 1,
        "code=INVALID_ARGUMENT,reason=ttl_negative": 1,
        "code=INVALID_ARGUMENT,reason=malformed_request": 1,
    }.items():
        assert refused.get(f"meshpilot_ca_csr_refused_total{{{key}}}") == count, key
    assert after["citadel_server_root_cert_expiry_timestamp"] == pytest.approx(
        x509.load_pem_x509_certificate(serve.root).not_valid_after_utc.timestamp()
    )


# --- the secure port: ADS needs a workload certificate --------------------------------


async def _ads_first_response(
    serve: Serve, cert: tuple[bytes, bytes] | None, node_id: str = NODE_SLEEP
) -> discovery_pb2.DiscoveryResponse:
    async with serve.channel(cert) as ch:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources(timeout=10)
        await call.write(
            discovery_pb2.DiscoveryRequest(node={"id": node_id}, type_url=typeurls.CLUSTER)
        )
        resp = await call.read()
        call.cancel()
        if resp is grpc.aio.EOF:
            await call  # raises the stream's status
        assert isinstance(resp, discovery_pb2.DiscoveryResponse)
        return resp


async def test_ads_on_secure_port_needs_a_valid_workload_certificate(
    processes: ProcessTracker, tmp_path: Path
) -> None:
    serve = await start_serve(processes, tmp_path / "ca")  # self-signed
    token = mint_token(serve.ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    chain = await create_certificate(serve, csr_pem(key), token)
    workload = (key_pem(key), "".join(chain).encode())

    details = await expect_refusal(_ads_first_response(serve, None), Code.UNAUTHENTICATED)
    assert "client certificate" in details

    resp = await _ads_first_response(serve, workload)
    assert resp.type_url == typeurls.CLUSTER and resp.nonce

    # A certificate for namespace default may not fetch another namespace's config.
    other_node = "sidecar~127.0.0.1~x.prod~prod.svc.cluster.local"
    await expect_refusal(_ads_first_response(serve, workload, other_node), Code.PERMISSION_DENIED)

    # A certificate from another CA fails the TLS handshake.
    other = await start_serve(processes, tmp_path / "other-ca")
    other_token = mint_token(other.ca_dir)
    foreign_chain = await create_certificate(other, csr_pem(key), other_token)
    foreign_cert = (key_pem(key), "".join(foreign_chain).encode())
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await _ads_first_response(serve, foreign_cert)
    assert e.value.code() in (Code.UNAVAILABLE, Code.UNAUTHENTICATED)

    # Renewal: the workload certificate alone authenticates a CSR (no token).
    renewed = await create_certificate(serve, csr_pem(key), None, validity=600, cert=workload)
    leaf = load_chain(renewed)[0]
    assert 600 <= (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() <= 720

    after = await serve.metrics()
    assert after["meshpilot_xds_secure_refused_total{reason=no_client_cert}"] >= 1
    assert after["meshpilot_xds_secure_refused_total{reason=namespace_mismatch}"] >= 1


async def test_self_signed_root_survives_a_restart(
    processes: ProcessTracker, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    first = await start_serve(processes, ca_dir)
    root = first.root
    key = ec.generate_private_key(ec.SECP256R1())
    chain = await create_certificate(first, csr_pem(key), mint_token(ca_dir))
    await processes.close()

    second = await start_serve(processes, ca_dir)
    assert second.root == root
    # The old certificate is still a valid client certificate for the new process.
    resp = await _ads_first_response(second, (key_pem(key), "".join(chain).encode()))
    assert resp.type_url == typeurls.CLUSTER
