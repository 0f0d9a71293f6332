"""deploy/kubernetes: valid Kubernetes objects, consistent with each other and with meshpilot.

Each object is checked against Kubernetes' own OpenAPI schemas (the `kubernetes-validate`
package ships them; its strict variant also refuses unknown fields), then read into the
client's models and written back unchanged (a misspelt field would be dropped there).
What the schemas cannot see is checked after: the names, ports and selectors that must
agree across files, and the exact RBAC rules.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_asyncio.client import ApiClient

from meshpilot.inject.cabundle import WEBHOOK_CONFIG
from meshpilot.inject.patch import INJECT_LABEL, ProxySettings
from meshpilot.inject.webhook import INJECT_PATH

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
KUBE_VERSION = "1.33"
NAMESPACE = "istio-system"
PORTS = {15010, 15012, 15014, 15017}


def documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
            docs.append((path.name, doc))
    return docs


DOCS = documents()


def one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in DOCS if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_every_kind_is_there() -> None:
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for _, d in DOCS)
    assert kinds == [
        "ClusterRole/istiod-istio-system",
        "ClusterRoleBinding/istiod-istio-system",
        "Deployment/istiod",
        "MutatingWebhookConfiguration/istio-sidecar-injector",
        "Namespace/istio-system",
        "PodDisruptionBudget/istiod",
        "Role/istiod",
        "RoleBinding/istiod",
        "Service/istiod",
        "Service/meshpilot",
        "ServiceAccount/istiod",
    ]


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    listed = sorted(kustomization["resources"])
    assert listed == sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize(("file", "doc"), DOCS, ids=[f"{f}:{d['kind']}" for f, d in DOCS])
def test_valid_against_the_kubernetes_schema(file: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


@pytest.mark.parametrize(("file", "doc"), DOCS, ids=[f"{f}:{d['kind']}" for f, d in DOCS])
async def test_client_models_read_and_write_it_back_unchanged(
    file: str, doc: dict[str, Any]
) -> None:
    async with ApiClient() as api:
        model = api.deserialize(SimpleNamespace(data=json.dumps(doc)), f"V1{doc['kind']}")
        assert api.sanitize_for_serialization(model) == doc


def test_namespaced_objects_are_in_istio_system() -> None:
    cluster_scoped = {
        "Namespace",
        "ClusterRole",
        "ClusterRoleBinding",
        "MutatingWebhookConfiguration",
    }
    for file, doc in DOCS:
        if doc["kind"] not in cluster_scoped:
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{file}: {doc['kind']}"


def test_deployment() -> None:
    deploy = one("Deployment")
    spec = deploy["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]
    assert spec["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert pod["spec"]["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    (container,) = pod["spec"]["containers"]
    assert container["command"] == ["meshpilot"]
    assert container["args"][:2] == ["serve", "--in-cluster"]
    assert {p["containerPort"] for p in container["ports"]} == PORTS
    # Every listener on the pod's address, or no other pod could reach it.
    for flag, port in [
        ("--xds-address", 15010),
        ("--secure-xds-address", 15012),
        ("--monitoring-address", 15014),
        ("--injection-address", 15017),
    ]:
        assert f"{flag}=0.0.0.0:{port}" in container["args"]
    # Injected sidecars run the control plane's own build by default.
    assert container["image"] == ProxySettings().image
    probe = container["readinessProbe"]["httpGet"]
    assert (probe["path"], probe["port"]) == ("/ready", 15014)
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    pdb = one("PodDisruptionBudget")
    assert pdb["spec"]["selector"] == spec["selector"]


@pytest.mark.parametrize("name", ["istiod", "meshpilot"])
def test_services_expose_the_control_planes_ports(name: str) -> None:
    service = one("Service", name)
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert ports == {15010: 15010, 15012: 15012, 15014: 15014, 443: 15017}


def test_webhook_configuration() -> None:
    config = one("MutatingWebhookConfiguration")
    assert config["metadata"]["name"] == WEBHOOK_CONFIG
    hooks = {w["name"]: w for w in config["webhooks"]}
    assert set(hooks) == {
        "namespace.sidecar-injector.istio.io",
        "object.sidecar-injector.istio.io",
    }
    for hook in hooks.values():
        service = hook["clientConfig"]["service"]
        assert service == {
            "name": "istiod",
            "namespace": NAMESPACE,
            "path": INJECT_PATH,
            "port": 443,
        }
        assert hook["rules"] == [
            {
                "operations": ["CREATE"],
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "resources": ["pods"],
            }
        ]
        assert hook["failurePolicy"] == "Fail"
        assert hook["sideEffects"] == "None"
        assert hook["admissionReviewVersions"] == ["v1"]
        # Written by the leader (meshpilot/inject/cabundle.py): a value here would be
        # stale the moment the mesh root is not this one.
        assert "caBundle" not in hook["clientConfig"]

    by_namespace = hooks["namespace.sidecar-injector.istio.io"]
    assert by_namespace["namespaceSelector"]["matchExpressions"] == [
        {"key": "istio-injection", "operator": "In", "values": ["enabled"]}
    ]
    assert by_namespace["objectSelector"]["matchExpressions"] == [
        {"key": INJECT_LABEL, "operator": "NotIn", "values": ["false"]}
    ]
    by_object = hooks["object.sidecar-injector.istio.io"]
    assert by_object["namespaceSelector"]["matchExpressions"] == [
        {"key": "istio-injection", "operator": "DoesNotExist"}
    ]
    assert by_object["objectSelector"]["matchExpressions"] == [
        {"key": INJECT_LABEL, "operator": "In", "values": ["true"]}
    ]
    # istiod itself is never sent to the webhook: it can start while no replica answers.
    pod_labels = one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[INJECT_LABEL] == "false"


def rules(role: dict[str, Any]) -> set[tuple[str, str, str, str]]:
    """(apiGroup, resource, resourceName or "", verb) for every grant in a role."""
    out = set()
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for name in rule.get("resourceNames") or [""]:
                    for verb in rule["verbs"]:
                        out.add((group, resource, name, verb))
    return out


def grants(
    group: str, resources: list[str], verbs: list[str], name: str = ""
) -> set[tuple[str, str, str, str]]:
    return {(group, r, name, v) for r in resources for v in verbs}


def test_cluster_role_grants_exactly_what_meshpilot_uses() -> None:
    expected = (
        grants("", ["services", "pods", "nodes"], ["list", "watch"])
        | grants("", ["namespaces"], ["get", "list", "watch"])
        | grants("discovery.k8s.io", ["endpointslices"], ["list", "watch"])
        | grants("", ["configmaps"], ["get", "list", "watch", "create", "update", "patch"])
        | grants(
            "networking.istio.io",
            [
                "virtualservices",
                "destinationrules",
                "gateways",
                "serviceentries",
                "workloadentries",
                "sidecars",
            ],
            ["list", "watch"],
        )
        | grants(
            "security.istio.io", ["peerauthentications", "authorizationpolicies"], ["list", "watch"]
        )
        | grants("authentication.k8s.io", ["tokenreviews"], ["create"])
        | grants(
            "admissionregistration.k8s.io",
            ["mutatingwebhookconfigurations"],
            ["list", "watch", "patch"],
            WEBHOOK_CONFIG,
        )
    )
    assert rules(one("ClusterRole")) == expected


def test_role_in_istio_system_grants_leases_and_the_cas_secrets_only() -> None:
    expected = (
        grants("coordination.k8s.io", ["leases"], ["get", "create", "update"])
        | grants("", ["secrets"], ["get"], "cacerts")
        | grants("", ["secrets"], ["get"], "istio-ca-secret")
        | grants("", ["secrets"], ["create"])
    )
    role = one("Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert rules(role) == expected


@pytest.mark.parametrize(
    ("binding", "role"), [("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")]
)
def test_bindings_give_the_roles_to_the_service_account(binding: str, role: str) -> None:
    doc = one(binding)
    assert doc["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": role,
        "name": one(role)["metadata"]["name"],
    }
    account = one("ServiceAccount")["metadata"]
    assert doc["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
