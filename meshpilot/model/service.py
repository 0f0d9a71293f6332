"""Services and endpoints as the mesh sees them, whatever source they came from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from meshpilot.config import ConfigKey


class Protocol(StrEnum):
    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"
    GRPC_WEB = "GRPC-Web"
    HTTPS = "HTTPS"
    TLS = "TLS"
    TCP = "TCP"
    UDP = "UDP"
    MONGO = "Mongo"
    REDIS = "Redis"
    MYSQL = "MySQL"

    @property
    def is_http(self) -> bool:
        return self in (Protocol.HTTP, Protocol.HTTP2, Protocol.GRPC, Protocol.GRPC_WEB)

    @property
    def is_http2(self) -> bool:
        return self in (Protocol.HTTP2, Protocol.GRPC)


_BY_NAME = {p.value.lower(): p for p in Protocol} | {"grpc-web": Protocol.GRPC_WEB}
_APP_PROTOCOLS = {
    "http": Protocol.HTTP,
    "http2": Protocol.HTTP2,
    "kubernetes.io/h2c": Protocol.HTTP2,
    "grpc": Protocol.GRPC,
    "grpc-web": Protocol.GRPC_WEB,
    "https": Protocol.HTTPS,
    "kubernetes.io/wss": Protocol.HTTPS,
    "kubernetes.io/ws": Protocol.HTTP,
    "tls": Protocol.TLS,
    "tcp": Protocol.TCP,
    "udp": Protocol.UDP,
    "mongo": Protocol.MONGO,
    "redis": Protocol.REDIS,
    "mysql": Protocol.MYSQL,
}


def parse_protocol(value: str) -> Protocol | None:
    """An explicit protocol (ServiceEntry/Gateway/Sidecar `protocol` field)."""
    return _BY_NAME.get(value.strip().lower()) if value else None


def protocol_for_kube_port(name: str, app_protocol: str, l4: str = "TCP") -> Protocol:
    """Istio's rule: appProtocol, else the name prefix before '-', else TCP.

    Istio would sniff an unnamed port; meshpilot treats it as TCP, which never breaks
    HTTP traffic (it is proxied as bytes) and is what Istio does when sniffing is off.
    """
    if l4 == "UDP":
        return Protocol.UDP
    if app_protocol and (p := _APP_PROTOCOLS.get(app_protocol.lower())):
        return p
    prefix = name.split("-", 1)[0].lower() if name else ""
    if name.lower().startswith("grpc-web"):
        return Protocol.GRPC_WEB
    return _BY_NAME.get(prefix, Protocol.TCP) if prefix != "udp" else Protocol.TCP


class Resolution(StrEnum):
    CLIENT_SIDE_LB = "ClientSideLB"  # EDS with endpoints meshpilot knows
    DNS_LB = "DNSLB"  # STRICT_DNS
    DNS_ROUND_ROBIN = "DNSRoundRobinLB"  # LOGICAL_DNS
    PASSTHROUGH = "Passthrough"  # ORIGINAL_DST


@dataclass(frozen=True, slots=True)
class ServicePort:
    name: str
    port: int
    protocol: Protocol
    # Number, or a named port on the workload (Kubernetes targetPort string).
    target_port: int | None = None
    target_port_name: str = ""


@dataclass(frozen=True, slots=True)
class Service:
    hostname: str
    namespace: str
    name: str
    ports: tuple[ServicePort, ...]
    resolution: Resolution = Resolution.CLIENT_SIDE_LB
    addresses: tuple[str, ...] = ()
    mesh_external: bool = False
    export_to: frozenset[str] = frozenset({"*"})
    source: ConfigKey | None = None
    creation_timestamp: datetime | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    # Workload labels this service selects (k8s selector / ServiceEntry workloadSelector).
    selector: Mapping[str, str] | None = None

    def port(self, number: int) -> ServicePort | None:
        for p in self.ports:
            if p.port == number:
                return p
        return None

    def port_by_name(self, name: str) -> ServicePort | None:
        for p in self.ports:
            if p.name == name:
                return p
        return None

    @property
    def short_name(self) -> str:
        return self.hostname.split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One workload instance of one service port (Istio's IstioEndpoint)."""

    address: str
    port: int
    service_port_name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    locality: str = ""
    weight: int = 1
    service_account: str = ""
    network: str = ""
    tls_mode: str = "disabled"
    workload_name: str = ""
    namespace: str = ""


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes equality selector: every selector label present with the same value."""
    return all(labels.get(k) == v for k, v in selector.items())
