"""The CA's gRPC service on a real grpc.aio server: calls that never send a request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from meshpilot.ca.auth import TokenAuthenticator
from meshpilot.ca.authority import CertificateAuthority
from meshpilot.ca.secure import DEFAULT_SERVER_OPTIONS
from meshpilot.ca.server import CertificateService
from meshpilot.ca.tokens import TokenSigner
from meshpilot.protos import istio_ca_pb2, istio_ca_pb2_grpc

from ._helpers import SLEEP, csr_pem

PATH = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
TIMEOUT = 0.5


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[tuple[int, TokenSigner]]:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    signer = TokenSigner.from_ca_dir(tmp_path / "ca")
    service = CertificateService(
        ca, [TokenAuthenticator(signer, ca.trust_domain)], call_timeout=TIMEOUT
    )
    srv = grpc.aio.server(options=DEFAULT_SERVER_OPTIONS)
    service.register(srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        yield port, signer
    finally:
        await srv.stop(0)


async def _never() -> AsyncIterator[bytes]:
    await asyncio.Event().wait()
    yield b""  # pragma: no cover


async def test_a_call_that_never_sends_its_request_is_ended_by_the_server(
    server: tuple[int, TokenSigner],
) -> None:
    port, _ = server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_unary(PATH, request_serializer=None, response_deserializer=None)
        # No client deadline: only the server can end this call.
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(call(_never()), 10 * TIMEOUT + 5)
        took = time.monotonic() - started
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no request message within 0.5s" in (e.value.details() or "")
    assert took < 10 * TIMEOUT + 5


async def test_a_unary_call_is_still_served(server: tuple[int, TokenSigner]) -> None:
    port, signer = server
    token = signer.create("default", "sleep", 60)
    req = istio_ca_pb2.IstioCertificateRequest(csr=csr_pem(), validity_duration=3600)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(
            PATH,
            request_serializer=istio_ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=istio_ca_pb2.IstioCertificateResponse.FromString,
        )
        resp = await call(req, metadata=[("authorization", f"Bearer {token}")], timeout=10)
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(SLEEP)]


async def test_a_call_closed_without_a_request_is_invalid(
    server: tuple[int, TokenSigner],
) -> None:
    port, _ = server

    async def nothing() -> AsyncIterator[bytes]:
        return
        yield b""  # pragma: no cover

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.stream_unary(PATH, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(nothing(), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_ca_server_of_its_own_refuses_1mb_from_the_prefix(
    server: tuple[int, TokenSigner],
) -> None:
    # The CA without ADS: gRPC's own receive limit is the CA's, checked on the
    # message's length prefix before the message is received.
    port, _ = server
    big = istio_ca_pb2.IstioCertificateRequest(csr="x" * (1 << 20))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.CreateCertificate(big, timeout=10)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "65536" in (e.value.details() or "")
