"""Which listeners, routes and inbound clusters a sidecar gets, before any protobuf.

listeners.py, routes.py and clusters.py all read the same plan, so a listener never
names a route or a cluster that the other translators do not produce.

Outbound: every egress listener of the SidecarScope yields listeners keyed by
(address, port). A listener is *captured* (`bind_to_port: false`, reached through
virtualOutbound's original-destination hand-off) unless it is *bound*: the egress
listener has a `bind`, or `captureMode: NONE`, or DEFAULT capture on a proxy whose
interception mode is NONE (Istio's getBindToPort). Bound listeners without a bind
listen on 127.0.0.1. The first egress listener that claims a key wins, as the
locking of port-specific egress listeners over the catch-all does in Istio.

Inbound: Sidecar ingress listeners when there are any (Istio ignores service
instances then), otherwise one chain per port the proxy's service instances
receive traffic on (the endpoint/target port, as Istio since 1.10), and nothing at
all when the proxy does not capture traffic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from meshpilot.api.networking import IstioIngressListener, ServerTLSSettings
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.service import Protocol, Service, ServicePort, parse_protocol
from meshpilot.model.sidecar_scope import EgressScope, SidecarScope
from meshpilot.translators import naming
from meshpilot.translators.common import (
    PROXY_INBOUND_PORT,
    PROXY_OUTBOUND_PORT,
    RESERVED_PROXY_PORTS,
    cidr_range,
    is_ipv4,
)
from meshpilot.translators.l4_route import (
    NO_TCP_SETTINGS,
    L4Routes,
    L4Target,
    TcpSettings,
    TlsRoute,
)

_TLS_PROTOCOLS = frozenset({Protocol.HTTPS, Protocol.TLS})
REGISTRY_ONLY = "REGISTRY_ONLY"
INTERCEPTION_NONE = "NONE"
UNIX_PREFIX = "unix://"


@dataclass(frozen=True, slots=True)
class TcpChain:
    """A tcp_proxy filter chain for one service port, matched by CIDR or SNI.

    It goes to the service's own cluster unless a VirtualService `tcp`/`tls` rule
    routes it: then to `cluster`, or to `weighted` clusters when there are several.
    """

    cluster: str
    service: Service
    prefix_ranges: tuple[str, ...] = ()
    server_names: tuple[str, ...] = ()
    weighted: tuple[tuple[str, int], ...] = ()
    stat_prefix: str = ""
    settings: TcpSettings = NO_TCP_SETTINGS


def _chain(
    cluster: str,
    svc: Service,
    target: L4Target,
    prefix_ranges: tuple[str, ...] = (),
    server_names: tuple[str, ...] = (),
) -> TcpChain:
    return TcpChain(
        target.cluster,
        svc,
        prefix_ranges,
        server_names,
        target.weighted,
        target.stat_prefix,
        target.settings,
    )


@dataclass(frozen=True, slots=True)
class OutboundListenerPlan:
    address: str
    port: int
    bound: bool
    # Set when HTTP services use this listener: an HCM chain (the catch-all) over RDS.
    route_name: str | None
    http_services: tuple[Service, ...]
    tcp_chains: tuple[TcpChain, ...]
    # tcp_proxy target of the chain without a match, when no HCM takes that place.
    catch_all: TcpChain | None

    @property
    def name(self) -> str:
        if self.is_unix:
            return self.address  # Istio names unix-socket listeners by their path
        return naming.listener_name(self.address, self.port)

    @property
    def is_unix(self) -> bool:
        return self.address.startswith(UNIX_PREFIX)

    @property
    def needs_tls_inspector(self) -> bool:
        return any(c.server_names for c in self.tcp_chains)


@dataclass(frozen=True, slots=True)
class InboundPlan:
    """One port the workload receives traffic on: a filter chain or a bound listener."""

    port: int
    protocol: Protocol
    bound: bool
    bind: str
    # Where the inbound cluster sends traffic: an IP, a unix socket path
    # (`unix://...`), or "" for the original destination (ORIGINAL_DST).
    endpoint: str
    endpoint_port: int
    service: Service | None = None
    # Sidecar `ingress[].tls`: terminate TLS with these files instead of mesh mTLS.
    tls: ServerTLSSettings | None = None

    @property
    def cluster_name(self) -> str:
        return naming.inbound_cluster_name(self.port)

    @property
    def name(self) -> str:
        return naming.listener_name(self.bind, self.port)


@dataclass
class _Entry:
    address: str
    port: int
    bound: bool
    forced: Protocol | None
    members: list[tuple[Service, ServicePort]] = field(default_factory=list)


# --- outbound ---------------------------------------------------------------------------


def egress_is_bound(egress: EgressScope, proxy: Proxy) -> bool:
    if egress.bind:
        return True
    if egress.capture_mode == "NONE":
        return True
    return egress.capture_mode == "DEFAULT" and proxy.interception_mode == INTERCEPTION_NONE


def captures_outbound(scope: SidecarScope, proxy: Proxy) -> bool:
    """Whether virtualOutbound is emitted: capture is on and some egress listener uses it."""
    if proxy.interception_mode == INTERCEPTION_NONE:
        return False
    return any(not egress_is_bound(e, proxy) for e in scope.egress)


def outbound_plans(push: PushContext, proxy: Proxy) -> list[OutboundListenerPlan]:
    """Outbound listeners of a sidecar, in egress-listener order; [] for gateways."""
    if proxy.is_router:
        return []
    scope = push.sidecar_scope(proxy)
    entries: dict[tuple[str, int], _Entry] = {}
    for egress in scope.egress:
        bound = egress_is_bound(egress, proxy)
        address = egress.bind or (naming.LOCALHOST_V4 if bound else naming.WILDCARD_V4)
        claimed: set[tuple[str, int]] = set()
        if egress.port is not None:
            key = (address, egress.port.port)
            if key in entries or _reserved(egress.port.port, bound):
                continue
            if egress.port.protocol is Protocol.UDP:
                continue
            entry = _Entry(address, egress.port.port, bound, egress.port.protocol)
            for svc in egress.services:
                sp = svc.port(egress.port.port)
                if sp is not None:
                    entry.members.append((svc, sp))
            entries[key] = entry
            continue
        for svc in egress.services:
            for sp in svc.ports:
                key = (address, sp.port)
                if sp.protocol is Protocol.UDP or _reserved(sp.port, bound):
                    continue
                if key in entries and key not in claimed:
                    continue  # an earlier egress listener owns this address and port
                claimed.add(key)
                entries.setdefault(key, _Entry(address, sp.port, bound, None)).members.append(
                    (svc, sp)
                )
    plans: list[OutboundListenerPlan] = []
    named_ports: set[int] = set()
    l4 = L4Routes(push, proxy)
    for entry in entries.values():
        plan = _finish(entry, named_ports, l4)
        if plan is not None:
            plans.append(plan)
    return plans


def _reserved(port: int, bound: bool) -> bool:
    if bound:
        return port in RESERVED_PROXY_PORTS
    # Captured listeners never bind; only the virtual listeners' own ports clash.
    return port in (PROXY_OUTBOUND_PORT, PROXY_INBOUND_PORT)


def _finish(entry: _Entry, named_ports: set[int], l4: L4Routes) -> OutboundListenerPlan | None:
    http: dict[str, Service] = {}
    tcp: dict[str, tuple[Service, ServicePort, Protocol]] = {}
    for svc, sp in sorted(entry.members, key=lambda m: m[0].hostname):
        protocol = entry.forced or sp.protocol
        if protocol.is_http:
            http.setdefault(svc.hostname, svc)
        else:
            tcp.setdefault(svc.hostname, (svc, sp, protocol))
    chains: list[TcpChain] = []
    leftovers: list[TcpChain] = []
    used_cidrs: set[str] = set()
    # (CIDRs, server name) pairs already matched: Envoy rejects duplicate matches.
    used_snis: set[tuple[tuple[str, ...], str]] = set()
    tls_count = sum(1 for _, _, p in tcp.values() if p in _TLS_PROTOCOLS)
    for svc, sp, protocol in tcp.values():
        cluster = naming.outbound_cluster_name(sp.port, "", svc.hostname)
        if protocol in _TLS_PROTOCOLS:
            tls_routes = l4.tls_routes(svc, entry.port)
            if tls_routes is not None:
                _tls_route_chains(entry, svc, tls_routes, chains, leftovers, used_cidrs, used_snis)
                continue
            target = None
        else:
            target = l4.tcp_target(svc, entry.port)
        if target is None:
            target = L4Target.single(cluster, l4.tcp_settings(svc, "", sp.port))
        plain = _chain(cluster, svc, target)
        if not entry.bound and svc.addresses:
            # The original destination tells services apart on a captured listener.
            cidrs = _cidrs(svc.addresses, used_cidrs)
            if cidrs:
                chains.append(_chain(cluster, svc, target, prefix_ranges=cidrs))
            continue
        if protocol in _TLS_PROTOCOLS and (not entry.bound or tls_count > 1):
            if ((), svc.hostname) not in used_snis:
                used_snis.add(((), svc.hostname))
                chains.append(_chain(cluster, svc, target, server_names=(svc.hostname,)))
            if entry.bound:
                leftovers.append(plain)
            continue
        leftovers.append(plain)
    route_name = None
    if http or (entry.forced is not None and entry.forced.is_http):
        if entry.port in named_ports:
            route_name = naming.route_name_for_bind(entry.address, entry.port)
        else:
            route_name = naming.route_name_for_port(entry.port)
            named_ports.add(entry.port)
    # One chain may go without a match: the HCM if there is HTTP, else the first
    # remaining TCP service by hostname. Others on the same port cannot be told apart.
    catch_all = None if route_name is not None or not leftovers else leftovers[0]
    if route_name is None and not chains and catch_all is None:
        return None
    return OutboundListenerPlan(
        address=entry.address,
        port=entry.port,
        bound=entry.bound,
        route_name=route_name,
        http_services=tuple(http.values()),
        tcp_chains=tuple(chains),
        catch_all=catch_all,
    )


def _tls_route_chains(
    entry: _Entry,
    svc: Service,
    routes: list[TlsRoute],
    chains: list[TcpChain],
    leftovers: list[TcpChain],
    used_cidrs: set[str],
    used_snis: set[tuple[tuple[str, ...], str]],
) -> None:
    """Chains for a TLS service routed by a VirtualService: one per `tls` match, on
    its SNI names (and the service's VIPs on a captured listener), as Istio."""
    cidrs: tuple[str, ...] = ()
    if not entry.bound and svc.addresses:
        cidrs = _cidrs(svc.addresses, used_cidrs)
        if not cidrs:
            return  # another service owns these addresses on this port
    for route in routes:
        if not route.server_names:
            chain = _chain(route.target.cluster, svc, route.target, prefix_ranges=cidrs)
            if cidrs:
                chains.append(chain)
            else:
                leftovers.append(chain)  # no match at all: a catch-all candidate
            continue
        names = tuple(n for n in route.server_names if (cidrs, n) not in used_snis)
        if not names:
            continue
        used_snis.update((cidrs, n) for n in names)
        chains.append(
            _chain(route.target.cluster, svc, route.target, prefix_ranges=cidrs, server_names=names)
        )


def _cidrs(addresses: Iterable[str], used: set[str]) -> tuple[str, ...]:
    out: list[str] = []
    for text in addresses:
        rng = cidr_range(text)
        if rng is None:
            continue
        key = f"{rng.address_prefix}/{rng.prefix_len.value}"
        if key in used:
            continue  # Envoy rejects two chains with the same match
        used.add(key)
        out.append(key)
    return tuple(out)


def route_plans(push: PushContext, proxy: Proxy) -> dict[str, OutboundListenerPlan]:
    """Route name -> the (single) listener plan that refers to it."""
    return {p.route_name: p for p in outbound_plans(push, proxy) if p.route_name is not None}


# --- inbound ----------------------------------------------------------------------------


def captures_inbound(scope: SidecarScope, proxy: Proxy) -> bool:
    """Whether virtualInbound is emitted: capture is on and some ingress port uses it."""
    if proxy.is_router or proxy.interception_mode == INTERCEPTION_NONE:
        return False
    if not scope.ingress:
        return True
    return any(not _ingress_is_bound(i, proxy) for i in scope.ingress)


def _ingress_is_bound(listener: IstioIngressListener, proxy: Proxy) -> bool:
    if listener.capture_mode == "DEFAULT":
        return proxy.interception_mode == INTERCEPTION_NONE
    return listener.capture_mode == "NONE"


def inbound_plans(push: PushContext, proxy: Proxy) -> list[InboundPlan]:
    """Inbound ports of a sidecar, sorted by port; [] for gateways."""
    if proxy.is_router:
        return []
    scope = push.sidecar_scope(proxy)
    instances = push.service_instances(proxy)
    plans: dict[int, InboundPlan] = {}
    if scope.ingress:
        for il in scope.ingress:
            port = il.port.number
            bound = _ingress_is_bound(il, proxy)
            if port in plans or _inbound_reserved(port, bound):
                continue
            service = None
            instance_protocol = None
            for inst in instances:
                if port in (inst.port.port, inst.endpoint_port):
                    service, instance_protocol = inst.service, inst.port.protocol
                    break
            protocol = parse_protocol(il.port.protocol) or instance_protocol or Protocol.TCP
            endpoint, endpoint_port = _default_endpoint(il.default_endpoint, proxy)
            bind = il.bind or (proxy.ip if bound else naming.WILDCARD_V4)
            plans[port] = InboundPlan(
                port, protocol, bound, bind, endpoint, endpoint_port, service, il.tls
            )
    elif proxy.interception_mode != INTERCEPTION_NONE:
        for inst in instances:
            port = inst.endpoint_port
            if port in plans or inst.port.protocol is Protocol.UDP:
                continue
            if _inbound_reserved(port, False):
                continue
            plans[port] = InboundPlan(
                port,
                inst.port.protocol,
                False,
                naming.WILDCARD_V4,
                naming.LOCALHOST_V4,
                port,
                inst.service,
            )
    return [plans[p] for p in sorted(plans)]


def _inbound_reserved(port: int, bound: bool) -> bool:
    return port in RESERVED_PROXY_PORTS if bound else port == PROXY_INBOUND_PORT


def _default_endpoint(text: str, proxy: Proxy) -> tuple[str, int]:
    """Istio's defaultEndpoint forms: `127.0.0.1:PORT`, `0.0.0.0:PORT` (the proxy's
    IP), `unix:///path`; empty means the original destination."""
    if not text:
        return "", 0
    if text.startswith(UNIX_PREFIX):
        return text, 0
    host, _, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not port_text.isdigit():
        return "", 0
    if host == naming.WILDCARD_V4:
        ipv4 = [ip for ip in proxy.ip_addresses if is_ipv4(ip)]
        host = ipv4[0] if ipv4 else proxy.ip
    return host, int(port_text)
