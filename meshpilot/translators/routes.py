"""RDS: sidecar outbound route configurations, named by port (`"9080"`).

One virtual host per HTTP service on the listener, named `HOST:PORT`, with
Istio's domains: the FQDN, the short forms a client in the proxy's namespace may
use (`name`, same namespace only; `name.ns` and `name.ns.svc` from anywhere in
the cluster), the service VIPs, each with and without `:PORT`. A domain is kept
by the first service (by hostname) that claims it: Envoy rejects duplicates.
Unknown hosts hit `allow_any` (PassthroughCluster) or, with REGISTRY_ONLY,
`block_all` (502), as in Istio. A bound (explicit) listener has no original
destination to pass through to: with REGISTRY_ONLY it keeps `block_all`, otherwise
(where Istio would pass through) a Host no virtual host matches gets `no_route`, a
404 whose body says so and names the port (Envoy cannot put the Host in a direct
response body), instead of an empty answer the client cannot tell from an upstream
failure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2

from meshpilot.api.networking import TCPRoute, TLSRoute
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.routing import ResolvedVirtualService
from meshpilot.model.service import Service
from meshpilot.translators import naming
from meshpilot.translators.common import bool_value, duration, uint32
from meshpilot.translators.http_route import MAX_DIRECT_RESPONSE_BODY_BYTES, HttpRouteBuilder
from meshpilot.translators.plan import REGISTRY_ONLY, InboundPlan, OutboundListenerPlan, route_plans

RouteConfiguration: TypeAlias = route_pb2.RouteConfiguration
BLOCK_ALL_STATUS = 502
NO_ROUTE_STATUS = 404


def route_names_for(push: PushContext, proxy: Proxy) -> list[str]:
    """Every RDS name this proxy's listeners refer to, sorted."""
    return sorted(route_plans(push, proxy))


def source_label_names(push: PushContext, namespace: str) -> tuple[str, ...]:
    """Labels that VirtualService `sourceLabels` matches visible from `namespace` look
    at. Proxies in one scope with equal values for these share routes and listeners."""
    keys: set[str] = set()
    seen: set[int] = set()
    for vs in push.virtual_services(namespace).by_host.values():
        if id(vs) in seen:
            continue
        seen.add(id(vs))
        spec = vs.spec
        for rule in spec.http:
            for m in rule.match:
                keys.update(m.source_labels)
        l4_routes: list[TCPRoute | TLSRoute] = [*spec.tcp, *spec.tls]
        for l4 in l4_routes:
            for lm in l4.match:
                keys.update(lm.source_labels)
    return tuple(sorted(keys))


def source_labels_key(push: PushContext, proxy: Proxy) -> Hashable:
    """The proxy's values for `source_label_names`; None when no match looks at labels."""
    names = source_label_names(push, proxy.namespace)
    return tuple((k, proxy.labels.get(k)) for k in names) if names else None


def build_route_configs(
    push: PushContext, proxy: Proxy, names: Iterable[str] | None
) -> list[route_pb2.RouteConfiguration]:
    """One RouteConfiguration per requested name (all of them for None), in request
    order; a name no listener uses still gets a valid empty configuration."""
    plans = route_plans(push, proxy)
    wanted = sorted(plans) if names is None else list(dict.fromkeys(names))
    policy = push.sidecar_scope(proxy).outbound_traffic_policy
    builder = HttpRouteBuilder(push, proxy)
    out = []
    for name in wanted:
        plan = plans.get(name)
        if plan is None:
            out.append(RouteConfiguration(name=name, validate_clusters=bool_value(False)))
        else:
            out.append(_outbound_route_config(name, plan, builder, policy))
    return out


def _outbound_route_config(
    name: str, plan: OutboundListenerPlan, builder: HttpRouteBuilder, policy: str
) -> RouteConfiguration:
    rc = route_config_header(name)
    for spec in virtual_host_specs(plan, builder.proxy, policy):
        rc.virtual_hosts.append(build_virtual_host(spec, builder))
    return rc


def route_config_header(name: str) -> RouteConfiguration:
    """An outbound RouteConfiguration without its virtual hosts."""
    return RouteConfiguration(
        name=name,
        validate_clusters=bool_value(False),
        max_direct_response_body_size_bytes=uint32(MAX_DIRECT_RESPONSE_BODY_BYTES),
    )


# What a fallback virtual host (the `*` domain) is, when no service claims `*`.
ALLOW_ANY = "allow_any"
BLOCK_ALL = "block_all"
NO_ROUTE = "no_route"


@dataclass(frozen=True, slots=True)
class VirtualHostSpec:
    """One virtual host of an outbound route configuration, before it is built: a
    service's (with the domains left to it) or the fallback (`service` None)."""

    port: int
    domains: tuple[str, ...]
    service: Service | None = None
    fallback: str = ""


def virtual_host_specs(
    plan: OutboundListenerPlan, proxy: Proxy, policy: str
) -> list[VirtualHostSpec]:
    """The virtual hosts of the route configuration `plan` refers to, in order."""
    out: list[VirtualHostSpec] = []
    claimed: set[str] = set()
    for svc in sorted(plan.http_services, key=lambda s: s.hostname):
        domains = tuple(d for d in virtual_host_domains(svc, plan.port, proxy) if d not in claimed)
        if not domains:
            continue
        claimed.update(domains)
        out.append(VirtualHostSpec(plan.port, domains, svc))
    if "*" not in claimed:
        if policy == REGISTRY_ONLY:
            fallback = BLOCK_ALL
        elif plan.bound:
            fallback = NO_ROUTE
        else:
            fallback = ALLOW_ANY
        out.append(VirtualHostSpec(plan.port, ("*",), None, fallback))
    return out


def build_virtual_host(
    spec: VirtualHostSpec, builder: HttpRouteBuilder
) -> route_components_pb2.VirtualHost:
    svc = spec.service
    if svc is None:
        if spec.fallback == BLOCK_ALL:
            return _block_all()
        if spec.fallback == NO_ROUTE:
            return _no_route(spec.port)
        return _allow_any()
    return route_components_pb2.VirtualHost(
        name=naming.virtual_host_name(svc.hostname, spec.port),
        domains=spec.domains,
        routes=builder.service_routes(svc, spec.port),
        include_request_attempt_count=True,
    )


def virtual_service_destination_hosts(push: PushContext, vs: ResolvedVirtualService) -> list[str]:
    """FQDNs every `http` route and mirror of `vs` sends to, sorted: the routes it
    yields depend on these services and their DestinationRules (clusters and hashing)."""
    ns = vs.config.namespace
    found: set[str] = set()
    for rule in vs.spec.http:
        for rd in rule.route:
            found.add(push.resolve_host(rd.destination.host, ns))
        if rule.mirror is not None:
            found.add(push.resolve_host(rule.mirror.host, ns))
        for m in rule.mirrors:
            found.add(push.resolve_host(m.destination.host, ns))
    return sorted(found)


def virtual_host_domains(svc: Service, port: int, proxy: Proxy) -> list[str]:
    """Istio's domains for a service port, without duplicates, in a stable order."""
    hosts = [svc.hostname, *alt_hostnames(svc.hostname, proxy.dns_domain)]
    for addr in svc.addresses:
        vip = _vip_host(addr)
        if vip:
            hosts.append(vip)
    out: list[str] = []
    for h in hosts:
        out.extend((h, f"{h}:{port}"))
    return list(dict.fromkeys(out))


def alt_hostnames(hostname: str, proxy_domain: str) -> list[str]:
    """Shorter names that resolve to `hostname` from a proxy in `proxy_domain`
    (`NAMESPACE.svc.cluster.local`), after Istio's GenerateAltVirtualHosts."""
    marker = ".svc."
    if marker in proxy_domain:
        proxy_ns, _, rest = proxy_domain.partition(marker)
        suffix = "svc." + rest
        if not hostname.endswith("." + suffix):
            return []
        parts = hostname[: -len(suffix) - 1].split(".")
        if len(parts) != 2 or not all(parts):
            return []
        name, ns = parts
        alts = [name] if ns == proxy_ns else []
        return [*alts, f"{name}.{ns}", f"{name}.{ns}.svc"]
    if proxy_domain and hostname.endswith("." + proxy_domain):
        return [hostname[: -len(proxy_domain) - 1]]
    return []


def _vip_host(addr: str) -> str:
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return ""  # CIDRs and hostnames never appear in a Host header
    if ip.is_unspecified:
        return ""
    return f"[{ip}]" if ip.version == 6 else str(ip)


def _allow_any() -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(
        name=naming.ALLOW_ANY_VHOST,
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                name=naming.ALLOW_ANY_VHOST,
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(
                    cluster=naming.PASSTHROUGH_CLUSTER, timeout=duration(0)
                ),
            )
        ],
        include_request_attempt_count=True,
    )


def _block_all() -> route_components_pb2.VirtualHost:
    return route_components_pb2.VirtualHost(
        name=naming.BLOCK_ALL_VHOST,
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                name=naming.BLOCK_ALL_VHOST,
                match=route_components_pb2.RouteMatch(prefix="/"),
                direct_response=route_components_pb2.DirectResponseAction(status=BLOCK_ALL_STATUS),
            )
        ],
        include_request_attempt_count=True,
    )


def _no_route(port: int) -> route_components_pb2.VirtualHost:
    body = f"meshpilot: no VirtualService or service matches this Host on port {port}\n"
    return route_components_pb2.VirtualHost(
        name=naming.NO_ROUTE_VHOST,
        domains=["*"],
        routes=[
            route_components_pb2.Route(
                name=naming.NO_ROUTE_VHOST,
                match=route_components_pb2.RouteMatch(prefix="/"),
                direct_response=route_components_pb2.DirectResponseAction(
                    status=NO_ROUTE_STATUS,
                    body=base_pb2.DataSource(inline_string=body),
                ),
            )
        ],
        include_request_attempt_count=True,
    )


def inbound_route_config(plan: InboundPlan) -> RouteConfiguration:
    """Inline route of an inbound HTTP chain: everything to `inbound|PORT||`."""
    host = plan.service.hostname if plan.service is not None else ""
    route = route_components_pb2.Route(
        name=naming.DEFAULT_ROUTE,
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(cluster=plan.cluster_name, timeout=duration(0)),
        decorator=route_components_pb2.Decorator(operation=f"{host}:{plan.port}/*"),
    )
    return RouteConfiguration(
        name=plan.cluster_name,
        validate_clusters=bool_value(False),
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=naming.inbound_virtual_host_name(plan.port),
                domains=["*"],
                routes=[route],
            )
        ],
    )
