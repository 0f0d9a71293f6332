"""CDS: outbound clusters per visible service port (and per DestinationRule subset),
inbound clusters, and Istio's fixed BlackHoleCluster, PassthroughCluster and
InboundPassthroughCluster.

DestinationRule traffic policies are merged and converted in traffic_policy.py; the
rule that applies is looked up for the proxy's namespace, as Istio does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import duration_pb2, struct_pb2

from meshpilot.api.networking import Subset
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.routing import ResolvedDestinationRule
from meshpilot.model.service import (
    Endpoint,
    Protocol,
    Resolution,
    Service,
    ServicePort,
    labels_match,
)
from meshpilot.translators import naming
from meshpilot.translators.common import (
    HTTP_PROTOCOL_OPTIONS_KEY,
    INBOUND_PASSTHROUGH_BIND_V4,
    INBOUND_PASSTHROUGH_BIND_V6,
    MAX_DURATION_SECONDS,
    ads_config_source,
    duration,
    duration_from_text,
    is_ip,
    is_ipv4,
    pack,
    pipe_address,
    socket_address,
)
from meshpilot.translators.endpoints import locality_lb_endpoints_of
from meshpilot.translators.locality import apply_locality_lb, group_by_locality
from meshpilot.translators.plan import UNIX_PREFIX, InboundPlan, inbound_plans
from meshpilot.translators.traffic_policy import (
    NO_POLICY,
    HttpProtocolOptions,
    add_config_metadata,
    apply_connection_pool,
    apply_load_balancer,
    apply_outlier_detection,
    default_thresholds,
    is_h2,
    locality_lb_setting,
    merge_traffic_policy,
    policy_for,
    set_h2,
    should_h2_upgrade,
)
from meshpilot.translators.upstream_tls import apply_tls, mesh_mtls

Cluster: TypeAlias = cluster_pb2.Cluster
DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
# Istio's passthrough clusters close idle upstream connections after 5 minutes.
PASSTHROUGH_IDLE_TIMEOUT_SECONDS = 300.0

_DISCOVERY_TYPE = {
    Resolution.CLIENT_SIDE_LB: Cluster.EDS,
    Resolution.DNS_LB: Cluster.STRICT_DNS,
    Resolution.DNS_ROUND_ROBIN: Cluster.LOGICAL_DNS,
    Resolution.PASSTHROUGH: Cluster.ORIGINAL_DST,
}


class OutboundClusterSpec:
    """One `outbound|PORT|SUBSET|HOST` cluster a proxy gets, before it is built: what
    its content depends on besides the mesh settings and the proxy's SDS capability
    (and, for DNS clusters, the proxy's IP family and locality)."""

    __slots__ = ("name", "port", "rule", "service", "subset")

    def __init__(
        self,
        name: str,
        service: Service,
        port: ServicePort,
        subset: Subset | None,
        rule: ResolvedDestinationRule | None,
    ) -> None:
        self.name = name
        self.service = service
        self.port = port
        self.subset = subset
        self.rule = rule

    @property
    def inline_endpoints(self) -> bool:
        """DNS clusters carry their endpoints (ordered by the proxy's locality)."""
        return self.service.resolution in (Resolution.DNS_LB, Resolution.DNS_ROUND_ROBIN)


def outbound_cluster_specs(push: PushContext, proxy: Proxy) -> list[OutboundClusterSpec]:
    """The proxy's outbound clusters, sorted by name (the first of a name wins)."""
    out: dict[str, OutboundClusterSpec] = {}
    for svc in push.sidecar_scope(proxy).services:
        ports = [sp for sp in svc.ports if sp.protocol is not Protocol.UDP]
        if not ports:
            continue
        dr = push.destination_rule(proxy.namespace, svc)
        subsets: list[Subset | None] = [None, *(dr.spec.subsets if dr is not None else ())]
        for sp in ports:
            for subset in subsets:
                name = naming.outbound_cluster_name(
                    sp.port, subset.name if subset is not None else "", svc.hostname
                )
                if name not in out:
                    out[name] = OutboundClusterSpec(name, svc, sp, subset, dr)
    return [out[name] for name in sorted(out)]


def connect_timeout_of(push: PushContext) -> duration_pb2.Duration:
    return duration_from_text(push.mesh.connect_timeout, DEFAULT_CONNECT_TIMEOUT_SECONDS)


def build_outbound_cluster(
    push: PushContext,
    proxy: Proxy,
    spec: OutboundClusterSpec,
    connect_timeout: duration_pb2.Duration | None = None,
    metadata: struct_pb2.Struct | None = None,
) -> Cluster:
    return _outbound_cluster(
        push,
        proxy,
        spec.service,
        spec.port,
        spec.rule,
        spec.subset,
        connect_timeout if connect_timeout is not None else connect_timeout_of(push),
        metadata if metadata is not None else service_metadata(spec.service),
    )


def local_clusters(push: PushContext, proxy: Proxy) -> list[Cluster]:
    """Inbound clusters (from the proxy's own service instances) and the fixed ones,
    sorted by name: the part of CDS that is the proxy's own."""
    connect_timeout = connect_timeout_of(push)
    out: dict[str, Cluster] = {}
    for plan in inbound_plans(push, proxy):
        c = _inbound_cluster(plan, connect_timeout)
        out.setdefault(c.name, c)
    fixed = [_blackhole(connect_timeout), _passthrough(connect_timeout)]
    if not proxy.is_router:
        fixed.append(_inbound_passthrough(proxy, connect_timeout))
    for c in fixed:
        out.setdefault(c.name, c)
    return [out[name] for name in sorted(out)]


def build_clusters(push: PushContext, proxy: Proxy) -> list[cluster_pb2.Cluster]:
    """Every cluster the proxy needs, sorted by name."""
    connect_timeout = connect_timeout_of(push)
    out: dict[str, Cluster] = {}
    # Shared by a service's clusters: Struct.update is slow, CopyFrom is not.
    metadata: dict[str, struct_pb2.Struct] = {}
    for spec in outbound_cluster_specs(push, proxy):
        host = spec.service.hostname
        if host not in metadata:
            metadata[host] = service_metadata(spec.service)
        out[spec.name] = build_outbound_cluster(push, proxy, spec, connect_timeout, metadata[host])
    for c in local_clusters(push, proxy):
        out.setdefault(c.name, c)
    return [out[name] for name in sorted(out)]


def dns_clusters_depend_on_locality(push: PushContext, proxy: Proxy) -> bool:
    """Whether a DNS cluster of this proxy carries endpoints prioritised or weighted by
    locality: then its CDS output depends on the proxy's locality (and labels), not only
    on its scope. The same for every proxy of a scope and namespace."""
    for svc in push.sidecar_scope(proxy).services:
        if svc.resolution not in (Resolution.DNS_LB, Resolution.DNS_ROUND_ROBIN):
            continue
        dr = push.destination_rule(proxy.namespace, svc)
        if dr is None:
            continue
        for sp in svc.ports:
            for subset in ["", *(s.name for s in dr.spec.subsets)]:
                policy = policy_for(dr, subset, sp.port)
                setting = locality_lb_setting(policy)
                if setting is not None and (
                    setting.distribute or policy.outlier_detection is not None
                ):
                    return True
    return False


def _outbound_cluster(
    push: PushContext,
    proxy: Proxy,
    svc: Service,
    sp: ServicePort,
    dr: ResolvedDestinationRule | None,
    subset: Subset | None,
    connect_timeout: duration_pb2.Duration,
    metadata: struct_pb2.Struct,
) -> Cluster:
    subset_name = subset.name if subset is not None else ""
    name = naming.outbound_cluster_name(sp.port, subset_name, svc.hostname)
    policy = (
        merge_traffic_policy(
            dr.spec.traffic_policy, subset.traffic_policy if subset else None, sp.port
        )
        if dr is not None
        else NO_POLICY
    )
    locality_setting = locality_lb_setting(policy)
    kind = _DISCOVERY_TYPE[svc.resolution]
    c = _base(name, kind, connect_timeout)
    opts = HttpProtocolOptions()
    if kind == Cluster.EDS:
        c.eds_cluster_config.eds_config.CopyFrom(ads_config_source())
        c.eds_cluster_config.service_name = name
    elif kind in (Cluster.STRICT_DNS, Cluster.LOGICAL_DNS):
        c.dns_lookup_family = _dns_family(proxy)
        endpoints: Iterable[Endpoint] = push.service_endpoints(svc.hostname, sp.port)
        if subset is not None:
            # DNS clusters carry their endpoints inline: filter them here as EDS would.
            endpoints = [ep for ep in endpoints if labels_match(subset.labels, ep.labels)]
        groups = apply_locality_lb(
            group_by_locality(endpoints),
            proxy,
            locality_setting,
            policy.outlier_detection is not None,
        )
        localities = locality_lb_endpoints_of(groups)
        if kind == Cluster.LOGICAL_DNS:
            # Envoy accepts exactly one host for LOGICAL_DNS; Istio keeps the first.
            localities = localities[:1]
            if localities:
                del localities[0].lb_endpoints[1:]
                localities[0].load_balancing_weight.value = (
                    localities[0].lb_endpoints[0].load_balancing_weight.value
                )
                localities[0].priority = 0
        c.load_assignment.CopyFrom(
            endpoint_pb2.ClusterLoadAssignment(cluster_name=name, endpoints=localities)
        )
    if sp.protocol.is_http2:
        set_h2(opts)
    # Istio's applyTrafficPolicy order: later steps may override earlier ones.
    apply_connection_pool(c, opts, policy.connection_pool)
    if should_h2_upgrade(policy.connection_pool):
        set_h2(opts)
    apply_outlier_detection(c, policy.outlier_detection)
    apply_load_balancer(c, policy.load_balancer, locality_setting)
    apply_tls(
        c,
        opts,
        policy.tls,
        h2=is_h2(opts),
        mesh=mesh_mtls(push, proxy, svc, sp.port, subset_name, policy),
    )
    if c.type == Cluster.ORIGINAL_DST:
        c.lb_policy = Cluster.CLUSTER_PROVIDED
    _pack_http_options(c, opts)
    c.metadata.filter_metadata["istio"].CopyFrom(metadata)
    if dr is not None:
        add_config_metadata(c.metadata, dr, subset_name)
    return c


def _pack_http_options(c: Cluster, opts: HttpProtocolOptions) -> None:
    if not opts.ListFields():
        return
    if opts.WhichOneof("upstream_protocol_options") is None:
        # Envoy requires a protocol choice once the options exist: HTTP/1.1, as before.
        opts.explicit_http_config.http_protocol_options.SetInParent()
    c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS_KEY].CopyFrom(pack(opts))


def _inbound_cluster(plan: InboundPlan, connect_timeout: duration_pb2.Duration) -> Cluster:
    name = plan.cluster_name
    if not plan.endpoint:
        c = _base(name, Cluster.ORIGINAL_DST, connect_timeout)
        c.lb_policy = Cluster.CLUSTER_PROVIDED
        # Original-destination hosts are per connection; never expire them (Istio).
        c.cleanup_interval.CopyFrom(duration(MAX_DURATION_SECONDS))
    else:
        c = _base(name, Cluster.STATIC, connect_timeout)
        c.lb_policy = Cluster.ROUND_ROBIN
        if plan.endpoint.startswith(UNIX_PREFIX):
            address = pipe_address(plan.endpoint.removeprefix(UNIX_PREFIX))
        else:
            address = socket_address(plan.endpoint, plan.endpoint_port)
        c.load_assignment.CopyFrom(
            endpoint_pb2.ClusterLoadAssignment(
                cluster_name=name,
                endpoints=[
                    endpoint_components_pb2.LocalityLbEndpoints(
                        lb_endpoints=[
                            endpoint_components_pb2.LbEndpoint(
                                endpoint=endpoint_components_pb2.Endpoint(address=address)
                            )
                        ]
                    )
                ],
            )
        )
    if plan.endpoint not in (naming.LOCALHOST_V4, "::1") and not plan.endpoint.startswith(
        UNIX_PREFIX
    ):
        # Traffic to the pod IP would be captured again by iptables unless it comes
        # from the address the capture rules exempt.
        c.upstream_bind_config.source_address.CopyFrom(
            address_pb2.SocketAddress(address=INBOUND_PASSTHROUGH_BIND_V4, port_value=0)
        )
    if plan.protocol.is_http2:
        _set_h2(c)
    if plan.service is not None:
        _istio_metadata(c, plan.service)
    return c


def _base(name: str, kind: int, connect_timeout: duration_pb2.Duration) -> Cluster:
    c = Cluster(name=name, type=kind, alt_stat_name=naming.alt_stat_name(name))
    c.connect_timeout.CopyFrom(connect_timeout)
    c.common_lb_config.SetInParent()
    c.circuit_breakers.CopyFrom(_default_circuit_breakers())
    return c


def _default_circuit_breakers() -> circuit_breaker_pb2.CircuitBreakers:
    out = circuit_breaker_pb2.CircuitBreakers()
    out.thresholds.append(default_thresholds())
    return out


def _set_h2(c: Cluster) -> None:
    opts = HttpProtocolOptions()
    set_h2(opts)
    c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS_KEY].CopyFrom(pack(opts))


def _dns_family(proxy: Proxy) -> int:
    ips = [ip for ip in proxy.ip_addresses if is_ip(ip)]
    if not ips or all(is_ipv4(ip) for ip in ips):
        return int(Cluster.V4_ONLY)
    if not any(is_ipv4(ip) for ip in ips):
        return int(Cluster.V6_ONLY)
    return int(Cluster.ALL)


def _istio_metadata(c: Cluster, svc: Service) -> None:
    c.metadata.filter_metadata["istio"].CopyFrom(service_metadata(svc))


def service_metadata(svc: Service) -> struct_pb2.Struct:
    """`filter_metadata.istio.services`, as Istio, for telemetry and config dumps."""
    istio = struct_pb2.Struct()
    istio.update(
        {"services": [{"host": svc.hostname, "name": svc.name, "namespace": svc.namespace}]}
    )
    if svc.mesh_external:
        istio.update({"external": True})
    return istio


def _blackhole(connect_timeout: duration_pb2.Duration) -> Cluster:
    c = Cluster(
        name=naming.BLACKHOLE_CLUSTER,
        type=Cluster.STATIC,
        lb_policy=Cluster.ROUND_ROBIN,
        alt_stat_name=naming.alt_stat_name(naming.BLACKHOLE_CLUSTER),
    )
    c.connect_timeout.CopyFrom(connect_timeout)
    return c


def _passthrough(connect_timeout: duration_pb2.Duration, name: str = "") -> Cluster:
    name = name or naming.PASSTHROUGH_CLUSTER
    c = _base(name, Cluster.ORIGINAL_DST, connect_timeout)
    c.lb_policy = Cluster.CLUSTER_PROVIDED
    opts = HttpProtocolOptions()
    opts.common_http_protocol_options.idle_timeout.CopyFrom(
        duration(PASSTHROUGH_IDLE_TIMEOUT_SECONDS)
    )
    # Unknown destinations speak whatever the client speaks.
    opts.use_downstream_protocol_config.http_protocol_options.SetInParent()
    opts.use_downstream_protocol_config.http2_protocol_options.SetInParent()
    c.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS_KEY].CopyFrom(pack(opts))
    return c


def _inbound_passthrough(proxy: Proxy, connect_timeout: duration_pb2.Duration) -> Cluster:
    c = _passthrough(connect_timeout, naming.INBOUND_PASSTHROUGH_CLUSTER)
    has_v4 = any(is_ipv4(ip) for ip in proxy.ip_addresses) or not proxy.ip_addresses
    has_v6 = any(is_ip(ip) and not is_ipv4(ip) for ip in proxy.ip_addresses)
    source = INBOUND_PASSTHROUGH_BIND_V4 if has_v4 else INBOUND_PASSTHROUGH_BIND_V6
    c.upstream_bind_config.source_address.CopyFrom(
        address_pb2.SocketAddress(address=source, port_value=0)
    )
    if has_v4 and has_v6:
        extra = c.upstream_bind_config.extra_source_addresses.add()
        extra.address.CopyFrom(
            address_pb2.SocketAddress(address=INBOUND_PASSTHROUGH_BIND_V6, port_value=0)
        )
    return c
