"""What one proxy may see: Istio's SidecarScope, from the Sidecar that applies to it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshpilot.api.networking import IstioEgressListener, IstioIngressListener, SidecarSpec
from meshpilot.config import Config, ConfigKey
from meshpilot.model.service import Protocol, Service, ServicePort, parse_protocol


@dataclass(frozen=True, slots=True)
class HostMatcher:
    """One `namespace/dnsName` entry of Sidecar egress hosts."""

    namespace: str  # "*" any, "~" none, else a namespace name
    host: str  # "*", "*.suffix" or an exact hostname

    @staticmethod
    def parse(text: str, config_namespace: str) -> HostMatcher:
        ns, sep, host = text.partition("/")
        if not sep:
            ns, host = "*", text
        if ns == ".":
            ns = config_namespace
        return HostMatcher(ns, host)

    def matches(self, svc: Service) -> bool:
        if self.namespace == "~":
            return False
        if self.namespace != "*" and self.namespace != svc.namespace:
            return False
        return host_matches(self.host, svc.hostname)


def host_matches(pattern: str, hostname: str) -> bool:
    """Istio host matching: `*` everything, `*.x` any name ending in `.x`, else exact."""
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return hostname.endswith(pattern[1:])
    return pattern == hostname


@dataclass(frozen=True, slots=True)
class EgressScope:
    """One egress listener: a port (None for the catch-all) and the services it sees."""

    port: ServicePort | None
    bind: str
    capture_mode: str
    hosts: tuple[HostMatcher, ...]
    services: tuple[Service, ...]


@dataclass(frozen=True, slots=True)
class SidecarScope:
    key: tuple[str, ...]
    namespace: str
    sidecar: ConfigKey | None
    egress: tuple[EgressScope, ...]
    ingress: tuple[IstioIngressListener, ...]
    services: tuple[Service, ...]
    outbound_traffic_policy: str

    @property
    def services_by_host(self) -> Mapping[str, Service]:
        return {s.hostname: s for s in self.services}


def build_sidecar_scope(
    namespace: str,
    sidecar: Config | None,
    visible: Iterable[Service],
    mesh_outbound_policy: str,
) -> SidecarScope:
    """Scope for proxies in `namespace` governed by `sidecar` (None: see everything)."""
    visible = tuple(visible)
    if sidecar is None:
        matcher = (HostMatcher("*", "*"),)
        egress = (EgressScope(None, "", "DEFAULT", matcher, visible),)
        return SidecarScope(
            ("default", namespace), namespace, None, egress, (), visible, mesh_outbound_policy
        )
    spec: SidecarSpec = sidecar.spec
    egress_specs: list[IstioEgressListener] = list(spec.egress) or [
        IstioEgressListener(hosts=["*/*"])
    ]
    egress_scopes = []
    union: dict[str, Service] = {}
    for listener in egress_specs:
        matchers = tuple(HostMatcher.parse(h, namespace) for h in listener.hosts)
        port = None
        if listener.port is not None:
            port = ServicePort(
                name=listener.port.name,
                port=listener.port.number,
                protocol=parse_protocol(listener.port.protocol) or Protocol.TCP,
                target_port=listener.port.target_port,
            )
        services = tuple(
            s
            for s in visible
            if any(m.matches(s) for m in matchers)
            and (port is None or s.port(port.port) is not None)
        )
        for s in services:
            union.setdefault(s.hostname, s)
        egress_scopes.append(
            EgressScope(port, listener.bind, listener.capture_mode, matchers, services)
        )
    policy = (
        spec.outbound_traffic_policy.mode
        if spec.outbound_traffic_policy is not None
        else mesh_outbound_policy
    )
    return SidecarScope(
        key=("sidecar", sidecar.namespace, sidecar.name, sidecar.revision, namespace),
        namespace=namespace,
        sidecar=sidecar.key,
        egress=tuple(egress_scopes),
        ingress=tuple(spec.ingress),
        services=tuple(sorted(union.values(), key=lambda s: s.hostname)),
        outbound_traffic_policy=policy,
    )
