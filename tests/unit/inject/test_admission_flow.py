"""Pod creation through the shipped webhook configuration, end to end.

The emulator does not call admission webhooks, so this test plays the API server's part
the way kube-apiserver does it: it reads `istio-sidecar-injector` (after the caBundle
patcher ran) and each namespace through the real client, matches rules,
namespaceSelector and objectSelector, calls the webhook over HTTPS trusting only the
configuration's caBundle with the Service's DNS name, checks the answer's uid, applies
the JSON Patch and creates the pod.
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes_asyncio.client import AdmissionregistrationV1Api, ApiClient, CoreV1Api

from meshpilot.ca.authority import CertificateAuthority
from meshpilot.inject import InjectionWebhook, ProxySettings
from meshpilot.inject.cabundle import WEBHOOK_CONFIG, CABundlePatcher
from tests.kube.apiserver import ApiServer
from tests.kube.conftest import api_client, apiserver, kubeconfig

from ._helpers import apply, deployment_pod, review, validate_pod

__all__ = ["api_client", "apiserver", "kubeconfig"]  # the emulator's fixtures, used here

MANIFEST = Path(__file__).resolve().parents[3] / "deploy" / "kubernetes" / "webhook.yaml"
NAMESPACES = {
    "bookinfo": {"istio-injection": "enabled"},
    "plain": {},
    "off": {"istio-injection": "disabled"},
}


def selected(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector against labels (an absent selector matches everything)."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        match op:
            case "In":
                ok = key in labels and labels[key] in values
            case "NotIn":
                ok = key not in labels or labels[key] not in values
            case "Exists":
                ok = key in labels
            case "DoesNotExist":
                ok = key not in labels
            case _:
                raise AssertionError(f"operator {op}")
        if not ok:
            return False
    return True


def rule_matches(rules: list[dict[str, Any]]) -> bool:
    return any(
        "CREATE" in r["operations"] and "" in r["apiGroups"] and "v1" in r["apiVersions"]
        and "pods" in r["resources"]
        for r in rules
    )  # fmt: skip


class ApiServerAdmission:
    """kube-apiserver's mutating admission for pod creation, against one webhook port."""

    def __init__(self, client: ApiClient, webhook_port: int) -> None:
        self.client = client
        self.port = webhook_port
        self.calls: list[str] = []

    async def create_pod(self, namespace: str, pod: dict[str, Any]) -> dict[str, Any]:
        admission = AdmissionregistrationV1Api(self.client)
        core = CoreV1Api(self.client)
        config = self.client.sanitize_for_serialization(
            await admission.read_mutating_webhook_configuration(WEBHOOK_CONFIG)
        )
        ns = await core.read_namespace(namespace)
        ns_labels = ns.metadata.labels or {}
        for hook in config["webhooks"]:
            if not rule_matches(hook["rules"]):
                continue
            if not selected(hook.get("namespaceSelector"), ns_labels):
                continue
            if not selected(hook.get("objectSelector"), pod["metadata"].get("labels") or {}):
                continue
            pod = await self._call(hook, namespace, pod)
        created = await core.create_namespaced_pod(namespace, pod)
        out: dict[str, Any] = self.client.sanitize_for_serialization(created)
        return out

    async def _call(self, hook: dict[str, Any], namespace: str, pod: dict[str, Any]) -> Any:
        self.calls.append(hook["name"])
        service = hook["clientConfig"]["service"]
        ctx = ssl.create_default_context(
            cadata=base64.b64decode(hook["clientConfig"]["caBundle"]).decode()
        )
        doc = review({**pod, "metadata": {**pod["metadata"], "namespace": namespace}})
        uid = doc["request"]["uid"]
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"https://127.0.0.1:{self.port}{service['path']}",
                data=json.dumps(doc),
                headers={"Content-Type": "application/json"},
                ssl=ctx,
                server_hostname=f"{service['name']}.{service['namespace']}.svc",
                timeout=aiohttp.ClientTimeout(total=hook["timeoutSeconds"]),
            ) as resp,
        ):
            assert resp.status == 200
            answer = await resp.json()
        response = answer["response"]
        assert answer["apiVersion"] == "admission.k8s.io/" + hook["admissionReviewVersions"][0]
        assert response["uid"] == uid
        assert response["allowed"] is True
        if "patch" not in response:
            return pod
        assert response["patchType"] == "JSONPatch"
        return apply(pod, json.loads(base64.b64decode(response["patch"])))


@pytest.fixture
async def admission(
    apiserver: ApiServer, api_client: ApiClient, tmp_path: Path
) -> AsyncIterator[ApiServerAdmission]:
    for name, labels in NAMESPACES.items():
        apiserver.create("", "v1", "namespaces", {"metadata": {"name": name, "labels": labels}})
    apiserver.create(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        yaml.safe_load(MANIFEST.read_text()),
    )
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    await CABundlePatcher(api_client, ca.root_cert_pem).patch_once()
    chain, key = ca.issue_server_cert(["istiod.istio-system.svc", "meshpilot.istio-system.svc"])
    webhook = InjectionWebhook(None, ProxySettings(), chain, key)
    port = await webhook.start("127.0.0.1", 0)
    try:
        yield ApiServerAdmission(api_client, port)
    finally:
        await webhook.stop()


def app_pod(**labels: str) -> dict[str, Any]:
    pod = deployment_pod()
    del pod["metadata"]["namespace"]
    pod["metadata"]["labels"].update(labels)
    return pod


def containers(pod: dict[str, Any]) -> list[str]:
    return [c["name"] for c in pod["spec"]["containers"]]


async def test_pod_in_an_injection_namespace_gets_the_sidecar(
    admission: ApiServerAdmission,
) -> None:
    created = await admission.create_pod("bookinfo", app_pod())
    assert admission.calls == ["namespace.sidecar-injector.istio.io"]
    assert containers(created) == ["reviews", "istio-proxy"]
    assert [c["name"] for c in created["spec"]["initContainers"]] == ["istio-init"]
    assert "sidecar.istio.io/status" in created["metadata"]["annotations"]
    validate_pod({k: v for k, v in created.items() if k != "status"})


async def test_pod_opted_out_is_not_sent_to_the_webhook(admission: ApiServerAdmission) -> None:
    created = await admission.create_pod(
        "bookinfo", app_pod(**{"sidecar.istio.io/inject": "false"})
    )
    assert admission.calls == []
    assert containers(created) == ["reviews"]


async def test_pod_opted_in_outside_injection_namespaces(admission: ApiServerAdmission) -> None:
    created = await admission.create_pod("plain", app_pod(**{"sidecar.istio.io/inject": "true"}))
    assert admission.calls == ["object.sidecar-injector.istio.io"]
    assert containers(created) == ["reviews", "istio-proxy"]


@pytest.mark.parametrize(
    ("namespace", "labels"),
    [("plain", {}), ("off", {"sidecar.istio.io/inject": "true"})],
)
async def test_pods_neither_namespace_nor_pod_asked_for_are_untouched(
    admission: ApiServerAdmission, namespace: str, labels: dict[str, str]
) -> None:
    created = await admission.create_pod(namespace, app_pod(**labels))
    assert admission.calls == []
    assert containers(created) == ["reviews"]
