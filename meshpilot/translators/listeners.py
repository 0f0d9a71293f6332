"""LDS: a sidecar's outbound and inbound listeners (gateways come later).

What exists is decided in plan.py. This module turns it into listeners:

* captured outbound listeners `0.0.0.0_PORT` (`bind_to_port: false`), reached from
  `virtualOutbound` (0.0.0.0:15001, `use_original_dst`), and bound ones
  `BIND_PORT` for explicit Sidecar egress listeners;
* `virtualInbound` (0.0.0.0:15006, original_dst listener filter) with a chain per
  inbound port, and bound `BIND_PORT` listeners for Sidecar ingress listeners that
  do not capture.

Inbound chains get their TLS from PeerAuthentication (or a Sidecar ingress `tls`) and
their RBAC filters from AuthorizationPolicy: authn.py and authz.py decide, this module
assembles.

virtualOutbound/virtualInbound are emitted only when the proxy's interception
mode is not NONE *and* some egress/ingress listener captures; Istio looks at the
interception mode alone, which leaves useless virtual listeners on proxies whose
Sidecar says `captureMode: NONE` everywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.type.v3 import range_pb2
from google.protobuf import message

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.translators import naming
from meshpilot.translators.authn import (
    ChainVariant,
    InboundSecurity,
    extra_passthrough_ports,
    inbound_security,
    passthrough_variants,
    plan_variants,
)
from meshpilot.translators.common import (
    PROXY_INBOUND_PORT,
    PROXY_OUTBOUND_PORT,
    ads_config_source,
    bool_value,
    cidr_range,
    duration,
    pack,
    pipe_address,
    socket_address,
    uint32,
)
from meshpilot.translators.plan import (
    REGISTRY_ONLY,
    UNIX_PREFIX,
    InboundPlan,
    OutboundListenerPlan,
    TcpChain,
    captures_inbound,
    captures_outbound,
    inbound_plans,
    outbound_plans,
)
from meshpilot.translators.routes import inbound_route_config
from meshpilot.translators.tls import TLS_TRANSPORT_SOCKET

Listener: TypeAlias = listener_pb2.Listener
FilterChain: TypeAlias = listener_components_pb2.FilterChain
FilterChainMatch: TypeAlias = listener_components_pb2.FilterChainMatch

HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ROUTER_FILTER = "envoy.filters.http.router"
FAULT_FILTER = "envoy.filters.http.fault"
CORS_FILTER = "envoy.filters.http.cors"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
TLS_INSPECTOR_FILTER = "envoy.filters.listener.tls_inspector"
INTERCEPTION_TPROXY = "TPROXY"
TLS = "tls"


def build_listeners(push: PushContext, proxy: Proxy) -> list[listener_pb2.Listener]:
    """The proxy's listeners, sorted by name; [] for gateways (not built here yet)."""
    out = dict(outbound_listeners(push, proxy))
    for lst in local_listeners(push, proxy, frozenset(out)):
        out[lst.name] = lst
    return [out[name] for name in sorted(out)]


def outbound_listeners(push: PushContext, proxy: Proxy) -> dict[str, Listener]:
    """Outbound listeners and virtualOutbound by name: they depend on the proxy's
    sidecar scope, labels (sourceLabels), interception mode and namespace, never on its
    own service instances or IP, so every sidecar of a scope has the same ones."""
    if proxy.is_router:
        return {}
    scope = push.sidecar_scope(proxy)
    egress_cluster = (
        naming.BLACKHOLE_CLUSTER
        if scope.outbound_traffic_policy == REGISTRY_ONLY
        else naming.PASSTHROUGH_CLUSTER
    )
    out: dict[str, Listener] = {}
    for plan in outbound_plans(push, proxy):
        out.setdefault(plan.name, _outbound_listener(plan, egress_cluster))
    if captures_outbound(scope, proxy):
        out.setdefault(naming.VIRTUAL_OUTBOUND, _virtual_outbound(proxy, egress_cluster))
    return out


def local_listeners(push: PushContext, proxy: Proxy, taken: frozenset[str]) -> list[Listener]:
    """Bound inbound listeners and virtualInbound: the proxy's own part of LDS. Names in
    `taken` (outbound listeners) win a clash, as in Istio's order."""
    if proxy.is_router:
        return []
    scope = push.sidecar_scope(proxy)
    out: list[Listener] = []
    names = set(taken)
    inbound = inbound_plans(push, proxy)
    security = inbound_security(push, proxy) if inbound or captures_inbound(scope, proxy) else None
    for inbound_plan in inbound:
        if inbound_plan.bound and inbound_plan.name not in names:
            assert security is not None
            names.add(inbound_plan.name)
            out.append(_bound_inbound_listener(inbound_plan, security))
    if captures_inbound(scope, proxy) and naming.VIRTUAL_INBOUND not in names:
        assert security is not None
        out.append(_virtual_inbound(proxy, [p for p in inbound if not p.bound], security))
    return out


# --- outbound ---------------------------------------------------------------------------


def _outbound_listener(plan: OutboundListenerPlan, egress_cluster: str) -> Listener:
    address = (
        pipe_address(plan.address.removeprefix(UNIX_PREFIX))
        if plan.is_unix
        else socket_address(plan.address, plan.port)
    )
    lst = Listener(name=plan.name, address=address, traffic_direction=base_pb2.OUTBOUND)
    if not plan.bound:
        lst.bind_to_port.CopyFrom(bool_value(False))
    for chain in plan.tcp_chains:
        lst.filter_chains.append(_tcp_chain(chain))
    if plan.route_name is not None:
        hcm = _hcm(naming.outbound_http_stat_prefix(plan.address, plan.port))
        hcm.rds.route_config_name = plan.route_name
        hcm.rds.config_source.CopyFrom(ads_config_source())
        lst.filter_chains.append(FilterChain(filters=[_filter(HCM_FILTER, hcm)]))
    elif plan.catch_all is not None:
        lst.filter_chains.append(FilterChain(filters=[_chain_tcp_proxy(plan.catch_all)]))
    else:
        # Traffic to this port for an address no service claims: what virtualOutbound
        # would have done with it.
        lst.default_filter_chain.CopyFrom(
            FilterChain(name=egress_cluster, filters=[_tcp_proxy(egress_cluster)])
        )
    if plan.needs_tls_inspector:
        lst.listener_filters.append(
            listener_components_pb2.ListenerFilter(
                name=TLS_INSPECTOR_FILTER, typed_config=pack(tls_inspector_pb2.TlsInspector())
            )
        )
    return lst


def _tcp_chain(chain: TcpChain) -> FilterChain:
    match = FilterChainMatch()
    for text in chain.prefix_ranges:
        rng = cidr_range(text)
        if rng is not None:
            match.prefix_ranges.append(rng)
    match.server_names.extend(chain.server_names)
    return FilterChain(filter_chain_match=match, filters=[_chain_tcp_proxy(chain)])


def _virtual_outbound(proxy: Proxy, egress_cluster: str) -> Listener:
    lst = Listener(
        name=naming.VIRTUAL_OUTBOUND,
        address=socket_address(naming.WILDCARD_V4, PROXY_OUTBOUND_PORT),
        use_original_dst=bool_value(True),
        traffic_direction=base_pb2.OUTBOUND,
        filter_chains=[
            # Connections made straight to 15001 would loop through the passthrough.
            FilterChain(
                name=naming.VIRTUAL_OUTBOUND_BLACKHOLE_CHAIN,
                filter_chain_match=FilterChainMatch(destination_port=uint32(PROXY_OUTBOUND_PORT)),
                filters=[_tcp_proxy(naming.BLACKHOLE_CLUSTER)],
            ),
            FilterChain(
                name=naming.VIRTUAL_OUTBOUND_CATCH_ALL_CHAIN,
                filters=[_tcp_proxy(egress_cluster)],
            ),
        ],
    )
    if proxy.interception_mode == INTERCEPTION_TPROXY:
        lst.transparent.CopyFrom(bool_value(True))
    return lst


# --- inbound ----------------------------------------------------------------------------


def _inbound_chains(plan: InboundPlan, security: InboundSecurity) -> list[FilterChain]:
    """The port's chains: one per TLS variant, each with the workload's RBAC filters."""
    out = []
    for variant in plan_variants(plan, security):
        chain = FilterChain(name=plan.name, filters=_inbound_filters(plan, variant, security))
        if not plan.bound:
            chain.filter_chain_match.destination_port.CopyFrom(uint32(plan.port))
        _apply_variant(chain, variant)
        out.append(chain)
    return out


def _apply_variant(chain: FilterChain, variant: ChainVariant) -> None:
    match = chain.filter_chain_match
    match.transport_protocol = variant.transport_protocol
    match.application_protocols.extend(variant.application_protocols)
    if variant.tls is not None:
        chain.transport_socket.name = TLS_TRANSPORT_SOCKET
        chain.transport_socket.typed_config.CopyFrom(pack(variant.tls))


def _inbound_filters(
    plan: InboundPlan, variant: ChainVariant, security: InboundSecurity
) -> list[listener_components_pb2.Filter]:
    if variant.reject:
        return [_tcp_proxy(naming.BLACKHOLE_CLUSTER)]
    if plan.protocol.is_http:
        hcm = _hcm(naming.inbound_http_stat_prefix(plan.bind, plan.port))
        hcm.route_config.CopyFrom(inbound_route_config(plan))
        _inbound_hcm_security(hcm, variant, security)
        return [_filter(HCM_FILTER, hcm)]
    return [*security.authz.tcp, _tcp_proxy(plan.cluster_name)]


def _inbound_hcm_security(
    hcm: hcm_pb2.HttpConnectionManager, variant: ChainVariant, security: InboundSecurity
) -> None:
    # RBAC runs first, before fault injection or anything else sees the request.
    filters = [*security.authz.http, *hcm.http_filters]
    del hcm.http_filters[:]
    hcm.http_filters.extend(filters)
    if variant.peer_certificate:
        # Istio's inbound XFCC: keep what the calling proxy forwarded and add the peer
        # (`By` our SPIFFE ID, `Hash`, `Subject`, `URI` theirs, `DNS`).
        hcm.forward_client_cert_details = hcm_pb2.HttpConnectionManager.APPEND_FORWARD
        details = hcm.set_current_client_cert_details
        details.subject.CopyFrom(bool_value(True))
        details.uri = True
        details.dns = True
    # Otherwise Envoy's default, SANITIZE: Istio forwards a plaintext caller's header
    # too, which lets anyone claim any identity to the app; meshpilot strips it.


def _bound_inbound_listener(plan: InboundPlan, security: InboundSecurity) -> Listener:
    chains = _inbound_chains(plan, security)
    lst = Listener(
        name=plan.name,
        address=socket_address(plan.bind, plan.port),
        traffic_direction=base_pb2.INBOUND,
        filter_chains=chains,
    )
    if any(c.filter_chain_match.transport_protocol == TLS for c in chains):
        lst.listener_filters.append(_tls_inspector())
    return lst


def _virtual_inbound(proxy: Proxy, plans: list[InboundPlan], security: InboundSecurity) -> Listener:
    chains = [c for p in plans for c in _inbound_chains(p, security)]
    passthrough = []
    for port in extra_passthrough_ports(security.peer, plans):
        passthrough.extend(
            _passthrough_chains(security, passthrough_variants(security, port), port)
        )
    passthrough.extend(_passthrough_chains(security, passthrough_variants(security), None))
    lst = Listener(
        name=naming.VIRTUAL_INBOUND,
        address=socket_address(naming.WILDCARD_V4, PROXY_INBOUND_PORT),
        traffic_direction=base_pb2.INBOUND,
        listener_filters=[
            listener_components_pb2.ListenerFilter(
                name=ORIGINAL_DST_FILTER, typed_config=pack(original_dst_pb2.OriginalDst())
            )
        ],
        filter_chains=[
            FilterChain(
                name=naming.VIRTUAL_INBOUND_BLACKHOLE_CHAIN,
                filter_chain_match=FilterChainMatch(destination_port=uint32(PROXY_INBOUND_PORT)),
                filters=[_tcp_proxy(naming.BLACKHOLE_CLUSTER)],
            ),
            *chains,
            *passthrough,
        ],
    )
    inspector = _inbound_tls_inspector(lst.filter_chains)
    if inspector is not None:
        lst.listener_filters.append(inspector)
        # A client that never speaks first (a server-first protocol on a PERMISSIVE port)
        # is treated as plaintext after the inspection timeout instead of being dropped.
        lst.continue_on_listener_filters_timeout = True
    if proxy.interception_mode == INTERCEPTION_TPROXY:
        lst.transparent.CopyFrom(bool_value(True))
    return lst


def _passthrough_chains(
    security: InboundSecurity, variants: tuple[ChainVariant, ...], port: int | None
) -> list[FilterChain]:
    """Chains to InboundPassthroughCluster for ports no service declares: the workload's
    mTLS mode and TCP authorization still apply (Istio)."""
    out = []
    for variant in variants:
        cluster = naming.BLACKHOLE_CLUSTER if variant.reject else naming.INBOUND_PASSTHROUGH_CLUSTER
        chain = FilterChain(
            name=naming.VIRTUAL_INBOUND_CATCH_ALL_CHAIN,
            filters=[*security.authz.tcp, _tcp_proxy(cluster)],
        )
        if port is not None:
            chain.filter_chain_match.destination_port.CopyFrom(uint32(port))
        _apply_variant(chain, variant)
        out.append(chain)
    return out


def _tls_inspector(
    disabled: listener_components_pb2.ListenerFilterChainMatchPredicate | None = None,
) -> listener_components_pb2.ListenerFilter:
    f = listener_components_pb2.ListenerFilter(
        name=TLS_INSPECTOR_FILTER, typed_config=pack(tls_inspector_pb2.TlsInspector())
    )
    if disabled is not None:
        f.filter_disabled.CopyFrom(disabled)
    return f


def _inbound_tls_inspector(
    chains: Iterable[FilterChain],
) -> listener_components_pb2.ListenerFilter | None:
    """The TLS inspector, turned off on the ports that have no TLS chain (Istio does the
    same): None when no chain needs it."""
    tls_ports: set[int] = set()
    plain_ports: set[int] = set()
    catch_all_tls = False
    for chain in chains:
        match = chain.filter_chain_match
        needs = match.transport_protocol == TLS
        if not match.HasField("destination_port"):
            catch_all_tls = catch_all_tls or needs
            continue
        (tls_ports if needs else plain_ports).add(match.destination_port.value)
    plain_ports -= tls_ports
    if not tls_ports and not catch_all_tls:
        return None
    if catch_all_tls:
        return _tls_inspector(_ports_predicate(plain_ports) if plain_ports else None)
    predicate = listener_components_pb2.ListenerFilterChainMatchPredicate()
    predicate.not_match.CopyFrom(_ports_predicate(tls_ports))
    return _tls_inspector(predicate)


def _ports_predicate(ports: set[int]) -> listener_components_pb2.ListenerFilterChainMatchPredicate:
    Predicate = listener_components_pb2.ListenerFilterChainMatchPredicate
    rules = [
        Predicate(destination_port_range=range_pb2.Int32Range(start=p, end=p + 1))
        for p in sorted(ports)
    ]
    if len(rules) == 1:
        return rules[0]
    return Predicate(or_match=Predicate.MatchSet(rules=rules))


# --- filters ----------------------------------------------------------------------------


def _filter(name: str, config: message.Message) -> listener_components_pb2.Filter:
    return listener_components_pb2.Filter(name=name, typed_config=pack(config))


def _chain_tcp_proxy(chain: TcpChain) -> listener_components_pb2.Filter:
    """tcp_proxy to a chain's cluster or weighted clusters (VirtualService `tcp`), with
    the DestinationRule's idle timeout, connection duration and source-IP hashing."""
    proxy = tcp_proxy_pb2.TcpProxy(stat_prefix=chain.stat_prefix or chain.cluster)
    if chain.weighted:
        for name, weight in chain.weighted:
            proxy.weighted_clusters.clusters.add(name=name, weight=weight)
    else:
        proxy.cluster = chain.cluster
    settings = chain.settings
    if settings.idle_timeout is not None:
        proxy.idle_timeout.CopyFrom(duration(settings.idle_timeout))
    if settings.max_connection_duration is not None:
        proxy.max_downstream_connection_duration.CopyFrom(
            duration(settings.max_connection_duration)
        )
    if settings.hash_source_ip:
        proxy.hash_policy.add().source_ip.SetInParent()
    return _filter(TCP_PROXY_FILTER, proxy)


def _tcp_proxy(cluster: str, stat_prefix: str = "") -> listener_components_pb2.Filter:
    return _filter(
        TCP_PROXY_FILTER,
        tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix or cluster, cluster=cluster),
    )


def _hcm(stat_prefix: str) -> hcm_pb2.HttpConnectionManager:
    """Istio's HCM defaults; the caller sets `rds` or `route_config`."""
    hcm = hcm_pb2.HttpConnectionManager(
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        stat_prefix=stat_prefix,
        use_remote_address=bool_value(False),
        normalize_path=bool_value(True),
        path_with_escaped_slashes_action=hcm_pb2.HttpConnectionManager.KEEP_UNCHANGED,
        # Long-lived streams (gRPC, websockets) must not be cut by Envoy's 5m default.
        stream_idle_timeout=duration(0),
        upgrade_configs=[hcm_pb2.HttpConnectionManager.UpgradeConfig(upgrade_type="websocket")],
        # Istio's order: fault and cors (empty; routes configure them per route through
        # typed_per_filter_config), then the router.
        http_filters=[
            hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault())),
            hcm_pb2.HttpFilter(name=CORS_FILTER, typed_config=pack(cors_pb2.Cors())),
            hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=pack(router_pb2.Router())),
        ],
    )
    return hcm
