"""ServiceAccount tokens checked by TokenReview, against the emulator with the real client,
and a CSR through the CA's real gRPC service with such a token."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from kubernetes_asyncio.client import ApiClient

from meshpilot.ca.auth import (
    AuthenticationError,
    AuthenticatorUnavailable,
    CallCredentials,
    ClientCertAuthenticator,
)
from meshpilot.ca.authority import CertificateAuthority
from meshpilot.ca.identity import SpiffeId
from meshpilot.ca.kubeauth import KubeJWTAuthenticator, token_expiry
from meshpilot.ca.secure import DEFAULT_SERVER_OPTIONS
from meshpilot.ca.server import CertificateService
from meshpilot.kube.client import new_api_client
from meshpilot.monitoring import metrics
from meshpilot.protos import istio_ca_pb2
from tests.kube.apiserver import ApiServer
from tests.unit.ca._helpers import csr_pem

REVIEWS = ("create", "tokenreviews")
REVIEWS_ID = SpiffeId("cluster.local", "bookinfo", "reviews")


def bearer(token: str) -> CallCredentials:
    return CallCredentials({"authorization": f"Bearer {token}"}, None, "ipv4:127.0.0.1:5555")


def jwt_shaped(exp: float) -> str:
    def part(obj: object) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'RS256'})}.{part({'exp': int(exp), 'aud': ['istio-ca']})}.c2ln"


@pytest.fixture
async def api(kubeconfig: Path) -> AsyncIterator[ApiClient]:
    client = await new_api_client(kubeconfig, None, False)
    try:
        yield client
    finally:
        await client.close()


async def test_a_service_account_token_for_istio_ca_authenticates_as_its_identity(
    apiserver: ApiServer, api: ApiClient
) -> None:
    token = apiserver.add_service_account_token("bookinfo", "reviews", ["istio-ca"])
    auth = KubeJWTAuthenticator(api, "cluster.local")
    caller = await auth.authenticate_async(bearer(token))
    assert caller is not None
    assert caller.identity == REVIEWS_ID and caller.authenticator == "kube-jwt"
    # No bearer token: not this authenticator's business.
    assert await auth.authenticate_async(CallCredentials({}, None, "")) is None


async def test_other_audiences_and_unknown_tokens_are_refused_without_echoing_them(
    apiserver: ApiServer, api: ApiClient
) -> None:
    api_token = apiserver.add_service_account_token("bookinfo", "reviews")  # API audience
    auth = KubeJWTAuthenticator(api, "cluster.local")
    with pytest.raises(AuthenticationError, match="is invalid for the target audiences") as e:
        await auth.authenticate_async(bearer(api_token))
    assert api_token not in str(e.value)
    with pytest.raises(AuthenticationError, match="token lookup failed") as e:
        await auth.authenticate_async(bearer("not-a-token-anyone-issued"))
    assert "not-a-token-anyone-issued" not in str(e.value)
    with pytest.raises(AuthenticationError, match="larger than"):
        await auth.authenticate_async(bearer("x" * 20_000))
    assert apiserver.requests[REVIEWS] == 2


async def test_an_unreachable_api_server_is_unavailable_not_unauthenticated(
    apiserver: ApiServer, api: ApiClient
) -> None:
    token = apiserver.add_service_account_token("bookinfo", "reviews", ["istio-ca"])
    auth = KubeJWTAuthenticator(api, "cluster.local", review_timeout=2.0)
    await apiserver.stop()
    with pytest.raises(AuthenticatorUnavailable, match="TokenReview failed"):
        await auth.authenticate_async(bearer(token))
    await apiserver.start()
    apiserver.fail_next(1, 503)
    with pytest.raises(AuthenticatorUnavailable, match="503"):
        await auth.authenticate_async(bearer(token))
    apiserver.delay = 0.5
    slow = KubeJWTAuthenticator(api, "cluster.local", review_timeout=0.1)
    with pytest.raises(AuthenticatorUnavailable, match=r"no answer within 0\.1s"):
        await slow.authenticate_async(bearer(token))
    apiserver.delay = 0.0
    # Unavailability is not remembered: the next CSR gets a real answer.
    caller = await auth.authenticate_async(bearer(token))
    assert caller is not None and caller.identity == REVIEWS_ID


async def test_answers_are_cached_by_token_and_shared_by_concurrent_calls(
    apiserver: ApiServer, api: ApiClient
) -> None:
    token = apiserver.add_service_account_token("bookinfo", "reviews", ["istio-ca"])
    auth = KubeJWTAuthenticator(api, "cluster.local", negative_cache_ttl=1.0)
    apiserver.delay = 0.1
    callers = await asyncio.gather(*(auth.authenticate_async(bearer(token)) for _ in range(20)))
    assert {c.identity for c in callers if c is not None} == {REVIEWS_ID}
    assert apiserver.requests[REVIEWS] == 1
    await auth.authenticate_async(bearer(token))
    assert apiserver.requests[REVIEWS] == 1
    # A revoked token stays good for the cache's lifetime (60 s by default) ...
    apiserver.revoke_token(token)
    await auth.authenticate_async(bearer(token))
    assert apiserver.requests[REVIEWS] == 1
    # ... and refusals are remembered briefly.
    for _ in range(3):
        with pytest.raises(AuthenticationError):
            await auth.authenticate_async(bearer("unknown"))
    assert apiserver.requests[REVIEWS] == 2
    await asyncio.sleep(1.05)
    with pytest.raises(AuthenticationError):
        await auth.authenticate_async(bearer("unknown"))
    assert apiserver.requests[REVIEWS] == 3


async def test_a_cached_answer_never_outlives_the_tokens_expiry(
    apiserver: ApiServer, api: ApiClient
) -> None:
    token = apiserver.add_service_account_token(
        "bookinfo", "reviews", ["istio-ca"], token=jwt_shaped(time.time() + 0.5)
    )
    assert token_expiry(token) == pytest.approx(time.time() + 0.5, abs=1.0)
    auth = KubeJWTAuthenticator(api, "cluster.local")
    await auth.authenticate_async(bearer(token))
    await asyncio.sleep(1.1)
    await auth.authenticate_async(bearer(token))
    assert apiserver.requests[REVIEWS] == 2


async def test_the_cache_is_bounded(apiserver: ApiServer, api: ApiClient) -> None:
    tokens = [apiserver.add_service_account_token("ns", f"sa{i}", ["istio-ca"]) for i in range(5)]
    auth = KubeJWTAuthenticator(api, "cluster.local", cache_size=3)
    for t in tokens:
        await auth.authenticate_async(bearer(t))
    await auth.authenticate_async(bearer(tokens[0]))  # evicted: reviewed again
    assert apiserver.requests[REVIEWS] == 6
    await auth.authenticate_async(bearer(tokens[4]))  # recent: cached
    assert apiserver.requests[REVIEWS] == 6


# --- Through the CA's gRPC service ---------------------------------------------------------


@pytest.fixture
async def ca_port(api: ApiClient, tmp_path: Path) -> AsyncIterator[int]:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    auths = [KubeJWTAuthenticator(api, ca.trust_domain), ClientCertAuthenticator(ca.trust_domain)]
    service = CertificateService(ca, auths)
    srv = grpc.aio.server(options=DEFAULT_SERVER_OPTIONS)
    service.register(srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        yield port
    finally:
        await srv.stop(0)


async def create_certificate(
    port: int, token: str, uri: str
) -> istio_ca_pb2.IstioCertificateResponse:
    req = istio_ca_pb2.IstioCertificateRequest(csr=csr_pem(uri=uri), validity_duration=3600)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
            request_serializer=istio_ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=istio_ca_pb2.IstioCertificateResponse.FromString,
        )
        resp: istio_ca_pb2.IstioCertificateResponse = await call(
            req, metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
        return resp


def refused(code: str, reason: str) -> float:
    return (
        metrics.REGISTRY.get_sample_value(
            "meshpilot_ca_csr_refused_total", {"code": code, "reason": reason}
        )
        or 0.0
    )


async def test_a_csr_with_a_service_account_token_over_grpc(
    apiserver: ApiServer, ca_port: int
) -> None:
    token = apiserver.add_service_account_token("bookinfo", "reviews", ["istio-ca"])
    resp = await create_certificate(ca_port, token, str(REVIEWS_ID))
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(REVIEWS_ID)]

    # Someone else's identity with this token: the CA's SAN check refuses it.
    denied = refused("PERMISSION_DENIED", "foreign_identity")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create_certificate(ca_port, token, "spiffe://cluster.local/ns/bookinfo/sa/ratings")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert refused("PERMISSION_DENIED", "foreign_identity") == denied + 1

    bad = refused("UNAUTHENTICATED", "unauthenticated")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create_certificate(ca_port, "unknown-token", str(REVIEWS_ID))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert refused("UNAUTHENTICATED", "unauthenticated") == bad + 1

    other = apiserver.add_service_account_token("bookinfo", "reviews", ["istio-ca"])
    down = refused("UNAVAILABLE", "authenticator_unavailable")
    await apiserver.stop()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await create_certificate(ca_port, other, str(REVIEWS_ID))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    assert other not in (e.value.details() or "")
    assert refused("UNAVAILABLE", "authenticator_unavailable") == down + 1
