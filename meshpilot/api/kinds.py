"""Which apiVersion/kind pairs meshpilot reads, and the spec model of each."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from meshpilot.api import kube, networking, security
from meshpilot.config import kinds


@dataclass(frozen=True, slots=True)
class KindInfo:
    kind: str
    group: str
    versions: frozenset[str]
    spec_model: type[BaseModel]


_NETWORKING = frozenset({"v1", "v1beta1", "v1alpha3"})
_SECURITY = frozenset({"v1", "v1beta1"})

KINDS: dict[str, KindInfo] = {
    k.kind: k
    for k in (
        KindInfo(kinds.SERVICE, "", frozenset({"v1"}), kube.KubeServiceSpec),
        KindInfo(
            kinds.WORKLOAD_ENTRY, "networking.istio.io", _NETWORKING, networking.WorkloadEntrySpec
        ),
        KindInfo(
            kinds.SERVICE_ENTRY, "networking.istio.io", _NETWORKING, networking.ServiceEntrySpec
        ),
        KindInfo(kinds.SIDECAR, "networking.istio.io", _NETWORKING, networking.SidecarSpec),
        KindInfo(
            kinds.VIRTUAL_SERVICE, "networking.istio.io", _NETWORKING, networking.VirtualServiceSpec
        ),
        KindInfo(
            kinds.DESTINATION_RULE,
            "networking.istio.io",
            _NETWORKING,
            networking.DestinationRuleSpec,
        ),
        KindInfo(kinds.GATEWAY, "networking.istio.io", _NETWORKING, networking.GatewaySpec),
        KindInfo(
            kinds.PEER_AUTHENTICATION,
            "security.istio.io",
            _SECURITY,
            security.PeerAuthenticationSpec,
        ),
        KindInfo(
            kinds.AUTHORIZATION_POLICY,
            "security.istio.io",
            _SECURITY,
            security.AuthorizationPolicySpec,
        ),
    )
}

# Kubernetes kinds that appear in mesh manifests (Istio's samples among them) but carry
# nothing the control plane reads in file mode: accepted and skipped, not errors.
IGNORED_KINDS = frozenset(
    {
        "Deployment",
        "StatefulSet",
        "DaemonSet",
        "ReplicaSet",
        "Pod",
        "Job",
        "CronJob",
        "ServiceAccount",
        "ConfigMap",
        "Secret",
        "Namespace",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Ingress",
        "EndpointSlice",
        "Endpoints",
    }
)
