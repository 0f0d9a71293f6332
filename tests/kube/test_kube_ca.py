"""The CA from Secrets cacerts / istio-ca-secret, against the emulator with the real client."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from kubernetes_asyncio.client import ApiClient

from meshpilot.ca.cadir import PLUGIN_FILES
from meshpilot.ca.csr import CAConfigError
from meshpilot.ca.identity import SpiffeId
from meshpilot.ca.kubesecrets import (
    SELF_SIGNED_SECRET,
    SELF_SIGNED_TYPE,
    CAUnavailable,
    load_ca_from_secrets,
)
from meshpilot.kube.backoff import Backoff
from meshpilot.kube.client import new_api_client
from tests.kube.apiserver import ApiServer
from tests.unit.ca._helpers import SLEEP, csr_pem, istio_samples_certs, verify_with_cryptography

NS = "istio-system"


def quick() -> Backoff:
    return Backoff(0.05, 0.2)


@pytest.fixture
async def api(kubeconfig: Path) -> AsyncIterator[ApiClient]:
    client = await new_api_client(kubeconfig, None, False)
    try:
        yield client
    finally:
        await client.close()


def put_cacerts(apiserver: ApiServer, files: dict[str, bytes]) -> None:
    data = {k: base64.b64encode(v).decode() for k, v in files.items()}
    apiserver.create(
        "", "v1", "secrets", {"metadata": {"name": "cacerts", "namespace": NS}, "data": data}
    )


def sample_files() -> dict[str, bytes]:
    certs = istio_samples_certs()
    return {name: (certs / name).read_bytes() for name in PLUGIN_FILES}


async def test_the_cacerts_secret_makes_a_plugin_ca_whose_certs_verify_to_its_root(
    apiserver: ApiServer, api: ApiClient
) -> None:
    files = sample_files()
    put_cacerts(apiserver, files)
    ca = await load_ca_from_secrets(api, NS)
    assert ca.mode == "plug-in" and ca.ca_dir is None
    roots = x509.load_pem_x509_certificates(files["root-cert.pem"])
    assert list(ca.roots) == roots
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in ca.sign(csr_pem(), SLEEP)]
    sans = verify_with_cryptography(chain, roots, strict=False)
    assert sans == [x509.UniformResourceIdentifier(str(SLEEP))]
    # Nothing was written: a plug-in CA is only read.
    assert apiserver.get("", "v1", "secrets", NS, SELF_SIGNED_SECRET) is None
    assert apiserver.requests[("create", "secrets")] == 0


async def test_bad_cacerts_errors_name_the_secret_and_the_key(
    apiserver: ApiServer, api: ApiClient
) -> None:
    files = sample_files()
    files["ca-key.pem"] = b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n"
    put_cacerts(apiserver, files)
    with pytest.raises(CAConfigError, match=r"^Secret istio-system/cacerts key ca-key.pem: "):
        await load_ca_from_secrets(api, NS)
    apiserver.delete("", "v1", "secrets", NS, "cacerts")
    put_cacerts(apiserver, {"ca-cert.pem": files["ca-cert.pem"]})
    with pytest.raises(
        CAConfigError,
        match=r"Secret istio-system/cacerts: missing ca-key.pem, root-cert.pem, cert-chain.pem",
    ):
        await load_ca_from_secrets(api, NS)


async def test_a_self_signed_root_is_created_once_in_istio_ca_secret_and_reused(
    apiserver: ApiServer, api: ApiClient
) -> None:
    first = await load_ca_from_secrets(api, NS, "example.org")
    assert first.mode == "self-signed"
    secret = apiserver.get("", "v1", "secrets", NS, SELF_SIGNED_SECRET)
    assert secret is not None and secret["type"] == SELF_SIGNED_TYPE
    assert set(secret["data"]) == {"ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"}
    again = await load_ca_from_secrets(api, NS, "example.org")
    assert again.root_cert_pem == first.root_cert_pem
    assert apiserver.requests[("create", "secrets")] == 1
    # A certificate from one verifies with the other's root.
    sleep = SpiffeId("example.org", "default", "sleep")
    pems = first.sign(csr_pem(uri=str(sleep)), sleep)
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    assert verify_with_cryptography(chain, again.roots) == [
        x509.UniformResourceIdentifier(str(sleep))
    ]


async def test_istios_own_istio_ca_secret_with_an_empty_root_key_is_read(
    apiserver: ApiServer, api: ApiClient
) -> None:
    made = await load_ca_from_secrets(api, NS)
    secret = apiserver.get("", "v1", "secrets", NS, SELF_SIGNED_SECRET)
    assert secret is not None
    secret["data"]["root-cert.pem"] = ""
    secret["data"]["key.pem"] = ""
    rt = apiserver._rt("", "v1", "secrets")
    apiserver.rest.update(rt, "v1", NS, SELF_SIGNED_SECRET, secret)
    read = await load_ca_from_secrets(api, NS)
    assert read.root_cert_pem == made.root_cert_pem


async def test_two_replicas_racing_to_create_end_with_the_same_root(
    apiserver: ApiServer, kubeconfig: Path
) -> None:
    apis = [await new_api_client(kubeconfig, None, False) for _ in range(2)]
    try:
        # Every request waits first, so both reads answer 404 before either create.
        apiserver.delay = 0.2
        cas = await asyncio.gather(*(load_ca_from_secrets(a, NS) for a in apis))
    finally:
        for a in apis:
            await a.close()
    assert apiserver.requests[("create", "secrets")] == 2  # both tried; one got 409
    assert cas[0].root_cert_pem == cas[1].root_cert_pem
    secret = apiserver.get("", "v1", "secrets", NS, SELF_SIGNED_SECRET)
    assert secret is not None
    stored = base64.b64decode(secret["data"]["ca-cert.pem"]).decode()
    assert stored == cas[0].root_cert_pem


async def test_api_server_errors_are_retried_or_reported(
    apiserver: ApiServer, api: ApiClient
) -> None:
    apiserver.fail_next(3, 503)
    ca = await load_ca_from_secrets(api, NS, backoff=quick())
    assert ca.mode == "self-signed"

    apiserver.fail_next(1, 403)
    with pytest.raises(CAConfigError, match=r"Secret istio-system/cacerts: .*refused: 403"):
        await load_ca_from_secrets(api, NS, backoff=quick())

    await apiserver.stop()
    with pytest.raises(
        CAUnavailable, match=r"not available within 0\.5s \(API server unreachable\)"
    ):
        await load_ca_from_secrets(api, NS, give_up_after=0.5, backoff=quick())


async def test_a_replica_that_may_not_create_waits_for_the_root_another_creates(
    apiserver: ApiServer, api: ApiClient
) -> None:
    with pytest.raises(CAUnavailable, match="or no replica created the root"):
        await load_ca_from_secrets(api, NS, create=False, give_up_after=0.3, backoff=quick())
    waiting = asyncio.create_task(load_ca_from_secrets(api, NS, create=False, backoff=quick()))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    creator = await load_ca_from_secrets(api, NS)
    follower = await asyncio.wait_for(waiting, 5)
    assert follower.root_cert_pem == creator.root_cert_pem
    assert apiserver.requests[("create", "secrets")] == 1
