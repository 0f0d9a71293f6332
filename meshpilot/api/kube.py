"""The parts of Kubernetes kinds that the mesh reads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from meshpilot.api.base import KubeModel, Port


class KubeServicePort(KubeModel):
    name: str = ""
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str = ""
    port: Port
    target_port: Port | str | None = None


class KubeServiceSpec(KubeModel):
    selector: dict[str, str] | None = None
    ports: list[KubeServicePort] = Field(default_factory=list)
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str = Field(default="", alias="clusterIP")
    external_name: str = ""


# --- read by the Kubernetes source (not file mode): EndpointSlices, Pods, Nodes, Namespaces


class EndpointConditions(KubeModel):
    # Kubernetes: a nil `ready` means ready; `serving` defaults to `ready`.
    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None


class ObjectReference(KubeModel):
    kind: str = ""
    namespace: str = ""
    name: str = ""
    uid: str = ""


class ForZone(KubeModel):
    name: str


class EndpointHints(KubeModel):
    for_zones: list[ForZone] = Field(default_factory=list)


class Endpoint(KubeModel):
    addresses: list[str] = Field(min_length=1, max_length=100)
    conditions: EndpointConditions = Field(default_factory=EndpointConditions)
    hostname: str = ""
    target_ref: ObjectReference | None = None
    node_name: str = ""
    zone: str = ""
    hints: EndpointHints | None = None


class EndpointPort(KubeModel):
    name: str = ""
    # Kubernetes allows a port-less entry: "all ports" of the address.
    port: Port | None = None
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str = ""


class EndpointSliceSpec(KubeModel):
    """discovery.k8s.io/v1 EndpointSlice: its fields sit at the top level, not under spec;
    the owning Service is the `kubernetes.io/service-name` label."""

    address_type: Literal["IPv4", "IPv6", "FQDN"]
    endpoints: list[Endpoint] = Field(default_factory=list, max_length=1000)
    ports: list[EndpointPort] = Field(default_factory=list, max_length=100)


class PodSpec(KubeModel):
    """What the mesh reads of a v1 Pod, from its spec, status and metadata."""

    service_account_name: str = ""
    node_name: str = ""
    pod_ips: list[str] = Field(default_factory=list, alias="podIPs")
    phase: str = ""
    ready: bool = False
    deletion_timestamp: str = ""


class NodeSpec(KubeModel):
    """A v1 Node's locality, from its topology labels."""

    region: str = ""
    zone: str = ""
    subzone: str = ""


class NamespaceSpec(KubeModel):
    """A v1 Namespace: the labels (on the Config) are what the mesh reads."""

    phase: str = ""


class LabelSelectorRequirement(KubeModel):
    key: str = Field(min_length=1, max_length=317)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list, max_length=256)


class LabelSelector(KubeModel):
    """metav1.LabelSelector: matchLabels and matchExpressions, ANDed. Empty matches all."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=64)

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            match req.operator:
                case "In":
                    ok = present and labels[req.key] in req.values
                case "NotIn":
                    ok = not present or labels[req.key] not in req.values
                case "Exists":
                    ok = present
                case _:
                    ok = not present
            if not ok:
                return False
        return True
