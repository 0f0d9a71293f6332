"""A connected Envoy as Istio sees it: parsed from the node id and node metadata."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

SIDECAR = "sidecar"
ROUTER = "router"
PROXY_TYPES = frozenset({SIDECAR, ROUTER})


class ProxyIdError(ValueError):
    """The node id or metadata is not what an Istio proxy sends."""


@dataclass(frozen=True, slots=True)
class Locality:
    region: str = ""
    zone: str = ""
    subzone: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.region, self.zone, self.subzone) if p) or ""

    @staticmethod
    def parse(text: str) -> Locality:
        parts = [*text.split("/"), "", "", ""][:3] if text else ["", "", ""]
        return Locality(*parts)


@dataclass(frozen=True, slots=True)
class Proxy:
    """Identity and metadata of one proxy; immutable for the life of a connection."""

    id: str
    type: str
    ip_addresses: tuple[str, ...]
    workload_name: str
    namespace: str
    dns_domain: str
    labels: Mapping[str, str] = field(default_factory=dict)
    service_account: str = ""
    cluster_id: str = ""
    network: str = ""
    mesh_id: str = ""
    istio_version: str = ""
    interception_mode: str = "REDIRECT"
    locality: Locality = Locality()
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ip(self) -> str:
        return self.ip_addresses[0] if self.ip_addresses else "127.0.0.1"

    @property
    def is_router(self) -> bool:
        return self.type == ROUTER

    @property
    def pod_name(self) -> str:
        """The POD of the node id's `POD.NAMESPACE` part (a Kubernetes proxy's Pod)."""
        parts = self.id.split("~")
        return parts[2].partition(".")[0] if len(parts) == 4 else ""

    @staticmethod
    def from_node(node: base_pb2.Node) -> Proxy:
        """Parse `TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN` and Istio node metadata."""
        parts = node.id.split("~")
        if len(parts) != 4:
            raise ProxyIdError(
                f"node.id {node.id!r}: expected 4 '~'-separated parts "
                "TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local"
            )
        ptype, ip, pod_ns, domain = parts
        if ptype not in PROXY_TYPES:
            raise ProxyIdError(f"node.id {node.id!r}: type {ptype!r} is not sidecar or router")
        meta = json_format.MessageToDict(node.metadata) if node.HasField("metadata") else {}
        ips = _ips(meta.get("INSTANCE_IPS"), ip, node.id)
        pod, _, id_ns = pod_ns.partition(".")
        namespace = str(meta.get("NAMESPACE") or id_ns or "default")
        labels = meta.get("LABELS") or {}
        if not isinstance(labels, dict):
            raise ProxyIdError(f"node {node.id!r}: metadata.LABELS must be a map of strings")
        locality = Locality(node.locality.region, node.locality.zone, node.locality.sub_zone)
        return Proxy(
            id=node.id,
            type=ptype,
            ip_addresses=ips,
            workload_name=str(meta.get("WORKLOAD_NAME") or pod),
            namespace=namespace,
            dns_domain=domain,
            labels={str(k): str(v) for k, v in labels.items()},
            service_account=str(meta.get("SERVICE_ACCOUNT") or "default"),
            cluster_id=str(meta.get("CLUSTER_ID") or "Kubernetes"),
            network=str(meta.get("NETWORK") or ""),
            mesh_id=str(meta.get("MESH_ID") or ""),
            istio_version=str(meta.get("ISTIO_VERSION") or ""),
            interception_mode=str(meta.get("INTERCEPTION_MODE") or "REDIRECT"),
            locality=locality,
            metadata=meta,
        )


def _ips(instance_ips: Any, id_ip: str, node_id: str) -> tuple[str, ...]:
    raw = [s.strip() for s in str(instance_ips).split(",")] if instance_ips else [id_ip]
    out = []
    for candidate in raw:
        try:
            out.append(str(ipaddress.ip_address(candidate)))
        except ValueError as e:
            raise ProxyIdError(f"node {node_id!r}: {candidate!r} is not an IP address") from e
    return tuple(out)
