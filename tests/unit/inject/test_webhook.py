"""The webhook: AdmissionReview answers, malformed input, and real HTTPS with the mesh CA."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from meshpilot.ca.authority import CertificateAuthority
from meshpilot.inject import InjectionWebhook, ProxySettings
from meshpilot.inject.webhook import MAX_REVIEW_BYTES
from meshpilot.monitoring.metrics import REGISTRY

from ._helpers import apply, body, deployment_pod, patch_ops, review, validate_pod

NAMESPACE = "istio-system"
SANS = [f"istiod.{NAMESPACE}.svc", f"meshpilot.{NAMESPACE}.svc"]
UID = "705ab4f5-6393-11e8-b7cc-42010a800002"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"))


@pytest.fixture
def webhook(ca: CertificateAuthority) -> InjectionWebhook:
    chain, key = ca.issue_server_cert(SANS, ["127.0.0.1"])
    return InjectionWebhook(None, ProxySettings(), chain, key)


@pytest.fixture
async def serving(webhook: InjectionWebhook) -> AsyncIterator[int]:
    port = await webhook.start("127.0.0.1", 0)
    try:
        yield port
    finally:
        await webhook.stop()


def client_context(ca: CertificateAuthority) -> ssl.SSLContext:
    """What the API server does with the caBundle: trust the mesh root only."""
    return ssl.create_default_context(cadata=ca.root_cert_pem)


async def post(
    port: int, data: bytes, ctx: ssl.SSLContext, server_name: str = SANS[0]
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"https://127.0.0.1:{port}/inject",
            data=data,
            headers={"Content-Type": "application/json"},
            ssl=ctx,
            server_hostname=server_name,
        ) as resp,
    ):
        text = await resp.text()
        return resp.status, (json.loads(text) if resp.status == 200 else text)


def assert_allowed_without_patch(answer: dict[str, Any], uid: str = UID) -> None:
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["uid"] == uid
    assert answer["response"]["allowed"] is True
    assert "patch" not in answer["response"]
    assert "patchType" not in answer["response"]


# AdmissionReview in, AdmissionReview out.


def test_answer_has_the_requests_uid_and_a_base64_json_patch(webhook: InjectionWebhook) -> None:
    pod = deployment_pod()
    answer = webhook.review(body(review(pod, uid=UID)))
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["kind"] == "AdmissionReview"
    response = answer["response"]
    assert set(response) == {"uid", "allowed", "patchType", "patch"}
    assert response["uid"] == UID
    assert response["allowed"] is True
    assert response["patchType"] == "JSONPatch"
    out = apply(pod, patch_ops(answer))
    validate_pod(out)
    assert [c["name"] for c in out["spec"]["containers"]] == ["reviews", "istio-proxy"]


def test_a_v1beta1_review_is_answered_in_v1beta1(webhook: InjectionWebhook) -> None:
    doc = review(deployment_pod())
    doc["apiVersion"] = "admission.k8s.io/v1beta1"
    answer = webhook.review(body(doc))
    assert answer["apiVersion"] == "admission.k8s.io/v1beta1"
    assert patch_ops(answer)


def test_opted_out_and_already_injected_pods_are_allowed_unchanged(
    webhook: InjectionWebhook,
) -> None:
    opted_out = deployment_pod()
    opted_out["metadata"]["labels"]["sidecar.istio.io/inject"] = "false"
    assert_allowed_without_patch(webhook.review(body(review(opted_out))))

    once = apply(deployment_pod(), patch_ops(webhook.review(body(review(deployment_pod())))))
    assert_allowed_without_patch(webhook.review(body(review(once))))


def test_the_namespace_comes_from_the_request_when_the_pod_has_none(
    webhook: InjectionWebhook,
) -> None:
    pod = deployment_pod()
    del pod["metadata"]["namespace"]
    doc = review(pod)
    doc["request"]["namespace"] = "kube-system"
    assert_allowed_without_patch(webhook.review(body(doc)))


@pytest.mark.parametrize(
    "change",
    [
        {"operation": "UPDATE"},
        {"kind": {"group": "apps", "version": "v1", "kind": "Deployment"}},
    ],
)
def test_anything_but_pod_creation_passes_untouched(
    webhook: InjectionWebhook, change: dict[str, Any]
) -> None:
    answer = webhook.review(body(review(deployment_pod(), **change)))
    assert_allowed_without_patch(answer)
    assert "warnings" not in answer["response"]


def test_a_pod_the_template_cannot_apply_to_is_allowed_with_a_warning(
    webhook: InjectionWebhook,
) -> None:
    pod = deployment_pod(volumes=[{"name": "istio-envoy", "emptyDir": {}}])
    answer = webhook.review(body(review(pod)))
    assert_allowed_without_patch(answer)
    (warning,) = answer["response"]["warnings"]
    assert warning.startswith("meshpilot: sidecar not injected: spec.volumes already has")
    assert len(warning) <= 120


@pytest.mark.parametrize(
    ("data", "uid"),
    [
        (b"", ""),
        (b"\xff\xfe not json", ""),
        (b"[1, 2]", ""),
        (b"[" * 100_000, ""),
        (body({"apiVersion": "v1", "kind": "Pod"}), ""),
        (body({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}), ""),
        (body(review(deployment_pod(), uid="")), ""),
        (body(review(deployment_pod(), uid="u" * 1000)), ""),
        (body(review("not a pod")), UID),
        (body(review(deployment_pod(), namespace=["a"])), UID),
    ],
)
def test_malformed_reviews_are_allowed_without_a_patch(
    webhook: InjectionWebhook, data: bytes, uid: str
) -> None:
    answer = webhook.review(data)
    assert_allowed_without_patch(answer, uid)
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["response"]["warnings"][0].startswith("meshpilot: sidecar not injected")


def test_odd_field_types_in_the_pod_never_raise(webhook: InjectionWebhook) -> None:
    odd: list[dict[str, Any]] = [
        {"metadata": [], "spec": {"containers": "x"}},
        {"metadata": {"labels": ["a"], "annotations": 3}, "spec": None},
        {"metadata": {"labels": {"sidecar.istio.io/inject": None}}, "spec": {"containers": [1]}},
        {"metadata": {}, "spec": {"initContainers": [{"name": ["unhashable"]}]}},
    ]
    for pod in odd:
        answer = webhook.review(body(review(pod)))
        assert answer["response"]["allowed"] is True
        assert answer["response"]["uid"] == UID


def test_counters_with_istios_names(webhook: InjectionWebhook) -> None:
    def sample(name: str, labels: dict[str, str] | None = None) -> float:
        return REGISTRY.get_sample_value(f"sidecar_injection_{name}_total", labels or {}) or 0.0

    names = [("requests", None), ("success", None), ("skip", None)] + [
        ("failure", {"type": t}) for t in ("decode", "inject")
    ]
    before = [sample(n, lab) for n, lab in names]
    opted_out = deployment_pod()
    opted_out["metadata"]["labels"]["sidecar.istio.io/inject"] = "false"
    clash = deployment_pod(volumes=[{"name": "istio-token", "emptyDir": {}}])
    for data in (review(deployment_pod()), review(opted_out), review(clash), "x"):
        webhook.review(body(data))
    after = [sample(n, lab) for n, lab in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [4, 1, 1, 1, 1]


# Over HTTPS.


async def test_https_with_a_ca_issued_certificate_verified_against_the_root(
    ca: CertificateAuthority, serving: int
) -> None:
    ctx = client_context(ca)
    for name in SANS:
        status, answer = await post(serving, body(review(deployment_pod())), ctx, name)
        assert status == 200
        assert answer["response"]["patchType"] == "JSONPatch"
        validate_pod(apply(deployment_pod(), patch_ops(answer)))


async def test_a_client_without_the_mesh_root_refuses_the_server(serving: int) -> None:
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await post(serving, body(review(deployment_pod())), ssl.create_default_context())


async def test_a_name_outside_the_certificate_is_refused(
    ca: CertificateAuthority, serving: int
) -> None:
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await post(serving, b"{}", client_context(ca), "istiod.other.svc")


async def test_malformed_body_over_https_is_allowed(ca: CertificateAuthority, serving: int) -> None:
    status, answer = await post(serving, b"{not json", client_context(ca))
    assert status == 200
    assert_allowed_without_patch(answer, "")


async def test_an_oversized_body_is_413(ca: CertificateAuthority, serving: int) -> None:
    status, _ = await post(serving, b" " * (MAX_REVIEW_BYTES + 1), client_context(ca))
    assert status == 413


async def test_only_post_inject_is_served(ca: CertificateAuthority, serving: int) -> None:
    async with aiohttp.ClientSession() as session:
        url = f"https://127.0.0.1:{serving}"
        kw: dict[str, Any] = {"ssl": client_context(ca), "server_hostname": SANS[0]}
        async with session.get(f"{url}/inject", **kw) as resp:
            assert resp.status == 405
        async with session.post(f"{url}/mutate", data=b"{}", **kw) as resp:
            assert resp.status == 404


async def test_a_new_certificate_is_served_on_new_connections(
    ca: CertificateAuthority, webhook: InjectionWebhook, serving: int
) -> None:
    async def served_serial() -> int:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", serving, ssl=client_context(ca), server_hostname=SANS[0]
        )
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            return x509.load_der_x509_certificate(der).serial_number
        finally:
            writer.close()
            await writer.wait_closed()
            del reader

    before = await served_serial()
    chain, key = ca.issue_server_cert(SANS)
    webhook.set_certificate(chain, key)
    after = await served_serial()
    assert after != before
    assert after == x509.load_pem_x509_certificate(chain[0].encode()).serial_number


async def test_template_override_is_used_by_the_server(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text("spec:\n  containers:\n    - {name: istio-proxy, image: '${image}'}\n")
    chain, key = ca.issue_server_cert(SANS)
    hook = InjectionWebhook(path, ProxySettings(image="custom:2"), chain, key)
    port = await hook.start("127.0.0.1", 0)
    try:
        status, answer = await post(port, body(review(deployment_pod())), client_context(ca))
    finally:
        await hook.stop()
    assert status == 200
    out = apply(deployment_pod(), patch_ops(answer))
    validate_pod(out)
    assert out["spec"]["containers"][1] == {"name": "istio-proxy", "image": "custom:2"}
    assert "initContainers" not in out["spec"]
