"""The webhook caBundle patcher against the API server emulator, with the real client."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.client import AdmissionregistrationV1Api, ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from meshpilot.ca.authority import CertificateAuthority
from meshpilot.inject.cabundle import CABundlePatcher
from tests.kube.apiserver import ApiServer
from tests.kube.conftest import api_client, apiserver, kubeconfig

__all__ = ["api_client", "apiserver", "kubeconfig"]  # the emulator's fixtures, used here

GROUP, VERSION, RESOURCE = "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations"
MANIFEST = Path(__file__).resolve().parents[3] / "deploy" / "kubernetes" / "webhook.yaml"
WAIT = 10.0


def manifest_config() -> dict[str, Any]:
    """deploy/kubernetes' configuration, plus two webhooks that are not ours to patch."""
    config: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    other = copy.deepcopy(config["webhooks"][0])
    other["name"] = "elsewhere.example.com"
    other["clientConfig"]["service"]["namespace"] = "other-system"
    by_url = copy.deepcopy(config["webhooks"][0])
    by_url["name"] = "url.example.com"
    by_url["clientConfig"] = {"url": "https://hooks.example.com/inject"}
    config["webhooks"] += [other, by_url]
    return config


def root_pem(tmp_path: Path, name: str) -> str:
    return CertificateAuthority.load_or_create(tmp_path / name).root_cert_pem


def bundles(server: ApiServer) -> dict[str, str | None]:
    config = server.get(GROUP, VERSION, RESOURCE, "", "istio-sidecar-injector")
    assert config is not None
    return {w["name"]: w["clientConfig"].get("caBundle") for w in config["webhooks"]}


def encoded(pem: str) -> str:
    return base64.b64encode(pem.encode()).decode()


async def eventually(check: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not check():
        assert loop.time() < deadline, f"not within {WAIT}s: {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(patcher: CABundlePatcher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(patcher.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def ours(server: ApiServer, pem: str) -> Callable[[], bool]:
    def check() -> bool:
        b = bundles(server)
        return b["namespace.sidecar-injector.istio.io"] == encoded(pem) and b[
            "object.sidecar-injector.istio.io"
        ] == encoded(pem)

    return check


async def test_patch_writes_the_root_into_our_webhooks_only(
    apiserver: ApiServer, api_client: ApiClient, tmp_path: Path
) -> None:
    apiserver.create(GROUP, VERSION, RESOURCE, manifest_config())
    root = root_pem(tmp_path, "ca")
    patcher = CABundlePatcher(api_client, root)
    await patcher.patch_once()
    got = bundles(apiserver)
    assert base64.b64decode(got["namespace.sidecar-injector.istio.io"] or "").decode() == root
    assert ours(apiserver, root)()
    assert got["elsewhere.example.com"] is None
    assert got["url.example.com"] is None
    # Up to date: nothing more is written.
    await patcher.patch_once()
    assert patcher.patches == 1


async def test_a_stale_patch_is_refused_and_patch_once_reads_again(
    apiserver: ApiServer, api_client: ApiClient, tmp_path: Path
) -> None:
    apiserver.create(GROUP, VERSION, RESOURCE, manifest_config())
    patcher = CABundlePatcher(api_client, root_pem(tmp_path, "ca"))
    api = AdmissionregistrationV1Api(api_client)
    stale = api_client.sanitize_for_serialization(
        await api.read_mutating_webhook_configuration("istio-sidecar-injector")
    )
    # Someone reorders the webhooks between our read and our write.
    current = apiserver.get(GROUP, VERSION, RESOURCE, "", "istio-sidecar-injector")
    assert current is not None
    current["webhooks"].reverse()
    await api.replace_mutating_webhook_configuration("istio-sidecar-injector", current)
    with pytest.raises(ApiException) as info:
        await api.patch_mutating_webhook_configuration(
            "istio-sidecar-injector", patcher.patch_for(stale)
        )
    assert info.value.status in (409, 422)
    await patcher.patch_once()
    assert ours(apiserver, root_pem(tmp_path, "ca"))()


async def test_run_repairs_a_removed_bundle_and_follows_a_new_root(
    apiserver: ApiServer, api_client: ApiClient, tmp_path: Path
) -> None:
    apiserver.create(GROUP, VERSION, RESOURCE, manifest_config())
    first, second = root_pem(tmp_path, "a"), root_pem(tmp_path, "b")
    patcher = CABundlePatcher(api_client, first, backoff=(0.05, 0.2))
    api = AdmissionregistrationV1Api(api_client)
    async with running(patcher):
        await eventually(ours(apiserver, first), "first root written")
        # `kubectl apply -k deploy/kubernetes` again: the manifest has no caBundle.
        current = apiserver.get(GROUP, VERSION, RESOURCE, "", "istio-sidecar-injector")
        assert current is not None
        for hook in current["webhooks"]:
            hook["clientConfig"].pop("caBundle", None)
        await api.replace_mutating_webhook_configuration("istio-sidecar-injector", current)
        await eventually(ours(apiserver, first), "removed caBundle restored")

        patcher.set_root(second)
        await eventually(ours(apiserver, second), "new root written")


async def test_run_waits_for_the_configuration_and_survives_api_server_faults(
    apiserver: ApiServer, api_client: ApiClient, tmp_path: Path
) -> None:
    root = root_pem(tmp_path, "ca")
    patcher = CABundlePatcher(api_client, root, backoff=(0.05, 0.2))
    async with running(patcher) as task:
        await eventually(lambda: apiserver.requests[("list", RESOURCE)] > 0, "first list")
        apiserver.create(GROUP, VERSION, RESOURCE, manifest_config())
        await eventually(ours(apiserver, root), "created configuration patched")

        apiserver.cut_watches()
        apiserver.fail_next(3, 500)
        await apiserver.stop()
        await apiserver.start()
        apiserver.compact()
        apiserver.delete(GROUP, VERSION, RESOURCE, "", "istio-sidecar-injector")
        apiserver.create(GROUP, VERSION, RESOURCE, manifest_config())
        await eventually(ours(apiserver, root), "recreated configuration patched")
        assert not task.done()


async def test_a_root_that_is_not_pem_is_refused(api_client: ApiClient, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="caBundle: expected PEM certificates"):
        CABundlePatcher(api_client, "not a certificate")
    patcher = CABundlePatcher(api_client, root_pem(tmp_path, "ca"))
    with pytest.raises(ValueError, match="caBundle: expected PEM certificates"):
        patcher.set_root("")
