"""The secure port as serve.py wires it: the internal plaintext server serves relays only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from meshpilot.ca.tokens import TokenSigner
from meshpilot.protos import istio_ca_pb2, istio_ca_pb2_grpc
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings

from ._helpers import csr_pem

SERVER_NAME = "istiod.istio-system.svc"


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[MeshServer]:
    srv = MeshServer(
        Settings(
            xds_address="127.0.0.1:0",
            monitoring_address="127.0.0.1:0",
            ca_dir=tmp_path / "ca",
            secure_xds_address="127.0.0.1:0",
        )
    )
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def _request() -> istio_ca_pb2.IstioCertificateRequest:
    return istio_ca_pb2.IstioCertificateRequest(csr=csr_pem(), validity_duration=3600)


def _token(srv: MeshServer) -> list[tuple[str, str]]:
    assert srv.settings.ca_dir is not None
    token = TokenSigner.from_ca_dir(srv.settings.ca_dir).create("default", "sleep", 600)
    return [("authorization", f"Bearer {token}")]


async def test_a_plaintext_client_on_the_internal_port_gets_no_service(
    serve: MeshServer,
) -> None:
    secure = serve.secure
    assert secure is not None and secure.internal_port not in (0, secure.port)
    meta = _token(serve)
    # Through the TLS front the same token gets a certificate.
    creds = grpc.ssl_channel_credentials(secure.ca.root_cert_pem.encode())
    opts = [("grpc.ssl_target_name_override", SERVER_NAME)]
    async with grpc.aio.secure_channel(f"127.0.0.1:{secure.port}", creds, opts) as ch:
        stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(ch)
        resp = await stub.CreateCertificate(_request(), metadata=meta, timeout=10)
        assert resp.cert_chain

    # Straight to the internal port, in plaintext, from this host: refused.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secure.internal_port}") as ch:
        stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateCertificate(_request(), metadata=meta, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "did not come through the secure port's TLS front" in (e.value.details() or "")

        ads = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
        call = ads.StreamAggregatedResources(timeout=10)
        await call.write(discovery_pb2.DiscoveryRequest(type_url="x"))
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.read()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_1mb_request_is_refused_from_its_prefix_without_being_relayed(
    serve: MeshServer,
) -> None:
    secure = serve.secure
    assert secure is not None and secure._front is not None
    meta = _token(serve)
    creds = grpc.ssl_channel_credentials(secure.ca.root_cert_pem.encode())
    opts = [("grpc.ssl_target_name_override", SERVER_NAME)]
    big = istio_ca_pb2.IstioCertificateRequest(csr="x" * (1 << 20))
    before = secure._front.relayed_bytes
    async with grpc.aio.secure_channel(f"127.0.0.1:{secure.port}", creds, opts) as ch:
        stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateCertificate(big, metadata=meta, timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "above the 65536 byte limit" in (e.value.details() or "")
    assert f"request of {big.ByteSize()} bytes" in (e.value.details() or "")
    # Headers, settings and the marker reached the internal server; the megabyte did not.
    assert secure._front.relayed_bytes - before < 16 * 1024
    # The CA keeps serving, on a new connection.
    async with grpc.aio.secure_channel(f"127.0.0.1:{secure.port}", creds, opts) as ch:
        stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(ch)
        resp = await stub.CreateCertificate(_request(), metadata=meta, timeout=10)
        assert resp.cert_chain
