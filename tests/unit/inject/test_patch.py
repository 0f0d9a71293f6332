"""Which pods get a sidecar, and what the JSON Patch makes of them."""

from __future__ import annotations

import copy
import json
from typing import Any

import kubernetes_validate
import pytest

from meshpilot.inject.patch import (
    InjectionError,
    ProxySettings,
    injection_patch,
    injection_required,
)
from meshpilot.inject.template import Template

from ._helpers import apply, deployment_pod, validate_pod

PROXY = ProxySettings(image="registry.example/meshpilot:0.1.0")


@pytest.fixture(scope="module")
def template() -> Template:
    return Template.load()


def injected(pod: dict[str, Any], template: Template) -> dict[str, Any]:
    ns = pod["metadata"].get("namespace", "default")
    return apply(pod, injection_patch(pod, ns, template, PROXY))


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["name"]: i for i in items}


def test_patched_pod_is_a_valid_pod_with_init_container_sidecar_and_volumes(
    template: Template,
) -> None:
    pod = deployment_pod()
    validate_pod(pod)
    out = injected(pod, template)
    validate_pod(out)

    spec = out["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["istio-init"]
    assert [c["name"] for c in spec["containers"]] == ["reviews", "istio-proxy"]
    assert spec["containers"][0] == pod["spec"]["containers"][0]

    init = spec["initContainers"][0]
    assert init["command"] == ["meshpilot", "iptables"]
    assert init["args"] == [
        "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT",
        "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020",
    ]  # fmt: skip
    assert init["image"] == PROXY.image
    assert set(init["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}

    proxy = spec["containers"][1]
    assert proxy["command"] == ["meshpilot", "agent"]
    assert proxy["securityContext"]["runAsUser"] == 1337
    assert proxy["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in proxy["env"]}
    assert env == {
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
        "INSTANCE_IP": "status.podIP",
        "SERVICE_ACCOUNT": "spec.serviceAccountName",
    }
    args = proxy["args"]
    assert "--name=$(POD_NAME)" in args
    assert "--token-file=/var/run/secrets/tokens/istio-token" in args
    assert "--root-cert=/var/run/secrets/istio/root-cert.pem" in args
    assert "--ca-address=istiod.istio-system.svc:15012" in args
    # The pod's labels reach the agent (workload selectors match on them).
    assert args[-6:] == [
        "--label", "app=reviews", "--label", "pod-template-hash=7c9f8d6b5",
        "--label", "version=v1",
    ]  # fmt: skip

    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    assert mounts["istio-token"] == "/var/run/secrets/tokens"
    assert mounts["istiod-ca-cert"] == "/var/run/secrets/istio"
    volumes = by_name(spec["volumes"])
    token = volumes["istio-token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token == {"audience": "istio-ca", "expirationSeconds": 43200, "path": "istio-token"}
    assert volumes["istiod-ca-cert"]["configMap"]["name"] == "istio-ca-root-cert"

    meta = out["metadata"]
    assert meta["labels"]["security.istio.io/tlsMode"] == "istio"
    # Canonical name from `app`; the revision from `version`.
    assert meta["labels"]["service.istio.io/canonical-name"] == "reviews"
    assert meta["labels"]["service.istio.io/canonical-revision"] == "v1"
    assert meta["annotations"]["kubectl.kubernetes.io/default-container"] == "reviews"
    status = json.loads(meta["annotations"]["sidecar.istio.io/status"])
    assert status == {
        "initContainers": ["istio-init"],
        "containers": ["istio-proxy"],
        "volumes": ["istio-envoy", "istio-token", "istiod-ca-cert"],
        "imagePullSecrets": None,
        "revision": "default",
    }


def test_existing_lists_and_maps_are_extended_not_replaced(template: Template) -> None:
    pod = deployment_pod(
        initContainers=[{"name": "migrate", "image": "migrate:1"}],
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    pod["metadata"]["annotations"] = {"example.com/owner~team": "a/b"}
    out = injected(pod, template)
    validate_pod(out)
    # Capture first: the pod's own init containers already run behind it.
    assert [c["name"] for c in out["spec"]["initContainers"]] == ["istio-init", "migrate"]
    assert [v["name"] for v in out["spec"]["volumes"]] == [
        "data", "istio-envoy", "istio-token", "istiod-ca-cert",
    ]  # fmt: skip
    # Keys with `/` and `~` went through JSON Pointer escaping.
    assert out["metadata"]["annotations"]["example.com/owner~team"] == "a/b"
    assert "sidecar.istio.io/status" in out["metadata"]["annotations"]
    assert out["metadata"]["labels"]["app"] == "reviews"


def test_pod_without_labels_or_annotations_gets_both_maps(template: Template) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bare", "namespace": "default"},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }
    out = injected(pod, template)
    validate_pod(out)
    assert out["metadata"]["labels"]["service.istio.io/canonical-name"] == "bare"
    assert out["metadata"]["labels"]["service.istio.io/canonical-revision"] == "latest"
    # No labels: the agent gets no --label arguments at all.
    assert "--label" not in out["spec"]["containers"][1]["args"]


def test_workload_name_drops_the_replicaset_hash(template: Template) -> None:
    pod = deployment_pod()
    del pod["metadata"]["labels"]["app"]
    out = injected(pod, template)
    assert out["metadata"]["labels"]["service.istio.io/canonical-name"] == "reviews-v1"


def test_the_pods_own_canonical_labels_win(template: Template) -> None:
    pod = deployment_pod()
    pod["metadata"]["labels"]["service.istio.io/canonical-name"] = "reviews-svc"
    out = injected(pod, template)
    assert out["metadata"]["labels"]["service.istio.io/canonical-name"] == "reviews-svc"


def test_patch_does_not_change_the_pod_it_reads(template: Template) -> None:
    pod = deployment_pod()
    before = copy.deepcopy(pod)
    injection_patch(pod, "bookinfo", template, PROXY)
    assert pod == before


def test_a_name_the_template_adds_already_in_use_is_an_error(template: Template) -> None:
    pod = deployment_pod(volumes=[{"name": "istio-token", "emptyDir": {}}])
    with pytest.raises(
        InjectionError, match=r"spec.volumes already has an entry named 'istio-token'"
    ):
        injection_patch(pod, "bookinfo", template, PROXY)


@pytest.mark.parametrize(
    ("where", "value", "message"),
    [
        ("spec", {"volumes": {"name": "data"}}, "spec.volumes: expected a list"),
        ("spec", {"initContainers": "migrate"}, "spec.initContainers: expected a list"),
        ("metadata", {"annotations": ["a=b"]}, "metadata.annotations: expected a mapping"),
    ],
)
def test_a_field_of_the_wrong_type_is_an_error_not_replaced(
    template: Template, where: str, value: dict[str, Any], message: str
) -> None:
    pod = deployment_pod()
    pod[where].update(value)
    with pytest.raises(InjectionError, match=message):
        injection_patch(pod, "bookinfo", template, PROXY)


@pytest.mark.parametrize(
    ("labels", "annotations", "inject"),
    [
        ({}, {}, True),
        ({"sidecar.istio.io/inject": "true"}, {}, True),
        ({"sidecar.istio.io/inject": "false"}, {}, False),
        ({}, {"sidecar.istio.io/inject": "false"}, False),
        ({}, {"sidecar.istio.io/inject": "yes"}, True),
        # The label is the current API: it wins over the older annotation.
        ({"sidecar.istio.io/inject": "true"}, {"sidecar.istio.io/inject": "false"}, True),
        ({"sidecar.istio.io/inject": "false"}, {"sidecar.istio.io/inject": "true"}, False),
    ],
)
def test_opt_in_and_opt_out(
    labels: dict[str, str], annotations: dict[str, str], inject: bool
) -> None:
    pod = deployment_pod()
    pod["metadata"]["labels"].update(labels)
    pod["metadata"]["annotations"] = annotations
    decision, warning = injection_required(pod, "bookinfo")
    assert decision.inject is inject
    assert warning is None


def test_an_unusable_opt_in_value_is_reported_and_the_default_applies() -> None:
    pod = deployment_pod()
    pod["metadata"]["labels"]["sidecar.istio.io/inject"] = "maybe"
    decision, warning = injection_required(pod, "bookinfo")
    assert decision.inject is True
    assert warning is not None and "'maybe' is neither true nor false" in warning


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda p: p["metadata"].setdefault("annotations", {}).update(
            {"sidecar.istio.io/status": "{}"}), "sidecar.istio.io/status"),
        (lambda p: p["spec"]["containers"].append(
            {"name": "istio-proxy", "image": "x"}), "istio-proxy container"),
        (lambda p: p["spec"].update({"hostNetwork": True}), "host network"),
    ],
)  # fmt: skip
def test_pods_left_alone(change: Any, reason: str) -> None:
    pod = deployment_pod()
    change(pod)
    decision, _ = injection_required(pod, "bookinfo")
    assert decision.inject is False
    assert reason in decision.reason


@pytest.mark.parametrize("namespace", ["kube-system", "kube-public", "kube-node-lease"])
def test_system_namespaces_are_never_injected(namespace: str) -> None:
    pod = deployment_pod()
    pod["metadata"]["labels"]["sidecar.istio.io/inject"] = "true"
    decision, _ = injection_required(pod, namespace)
    assert decision.inject is False


def test_the_schema_check_used_above_refuses_unknown_and_mistyped_fields() -> None:
    # The patched pods are judged by this check: it must see what the API server would.
    pod = deployment_pod()
    pod["spec"]["containers"][0]["runAsUser"] = 1337  # belongs in securityContext
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pod(pod)
    pod = deployment_pod()
    pod["spec"]["containers"][0]["args"] = ["-u", 1337]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_pod(pod)
