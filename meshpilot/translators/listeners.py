"""LDS: a sidecar's outbound and inbound listeners (gateways come later).

What exists is decided in plan.py. This module turns it into listeners:

* captured outbound listeners `0.0.0.0_PORT` (`bind_to_port: false`), reached from
  `virtualOutbound` (0.0.0.0:15001, `use_original_dst`), and bound ones
  `BIND_PORT` for explicit Sidecar egress listeners;
* `virtualInbound` (0.0.0.0:15006, original_dst listener filter) with a chain per
  inbound port, and bound `BIND_PORT` listeners for Sidecar ingress listeners that
  do not capture.

virtualOutbound/virtualInbound are emitted only when the proxy's interception
mode is not NONE *and* some egress/ingress listener captures; Istio looks at the
interception mode alone, which leaves useless virtual listeners on proxies whose
Sidecar says `captureMode: NONE` everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from google.protobuf import message

from meshpilot.model.proxy import Proxy
from meshpilot.translators import naming
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

if TYPE_CHECKING:
    # Type only: keeps the translators from importing the store and sources at runtime.
    from meshpilot.model.push_context import PushContext

Listener = listener_pb2.Listener
FilterChain = listener_components_pb2.FilterChain
FilterChainMatch = listener_components_pb2.FilterChainMatch

HCM_FILTER = "envoy.filters.network.http_connection_manager"
TCP_PROXY_FILTER = "envoy.filters.network.tcp_proxy"
ROUTER_FILTER = "envoy.filters.http.router"
FAULT_FILTER = "envoy.filters.http.fault"
CORS_FILTER = "envoy.filters.http.cors"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
TLS_INSPECTOR_FILTER = "envoy.filters.listener.tls_inspector"
INTERCEPTION_TPROXY = "TPROXY"


def build_listeners(push: PushContext, proxy: Proxy) -> list[listener_pb2.Listener]:
    """The proxy's listeners, sorted by name; [] for gateways (not built here yet)."""
    if proxy.is_router:
        return []
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
    inbound = inbound_plans(push, proxy)
    for plan in inbound:
        if plan.bound:
            # A name clash with an outbound listener keeps the outbound one (Istio's order).
            out.setdefault(plan.name, _bound_inbound_listener(plan))
    if captures_inbound(scope, proxy):
        chains = [_inbound_chain(p) for p in inbound if not p.bound]
        out.setdefault(naming.VIRTUAL_INBOUND, _virtual_inbound(proxy, chains))
    return [out[name] for name in sorted(out)]


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


def _inbound_chain(plan: InboundPlan) -> FilterChain:
    chain = FilterChain(name=plan.name, filters=[_inbound_filter(plan)])
    if not plan.bound:
        chain.filter_chain_match.destination_port.CopyFrom(uint32(plan.port))
    return chain


def _inbound_filter(plan: InboundPlan) -> listener_components_pb2.Filter:
    if plan.protocol.is_http:
        hcm = _hcm(naming.inbound_http_stat_prefix(plan.bind, plan.port))
        hcm.route_config.CopyFrom(inbound_route_config(plan))
        return _filter(HCM_FILTER, hcm)
    return _tcp_proxy(plan.cluster_name)


def _bound_inbound_listener(plan: InboundPlan) -> Listener:
    return Listener(
        name=plan.name,
        address=socket_address(plan.bind, plan.port),
        traffic_direction=base_pb2.INBOUND,
        filter_chains=[_inbound_chain(plan)],
    )


def _virtual_inbound(proxy: Proxy, chains: list[FilterChain]) -> Listener:
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
            FilterChain(
                name=naming.VIRTUAL_INBOUND_CATCH_ALL_CHAIN,
                filters=[_tcp_proxy(naming.INBOUND_PASSTHROUGH_CLUSTER)],
            ),
        ],
    )
    if proxy.interception_mode == INTERCEPTION_TPROXY:
        lst.transparent.CopyFrom(bool_value(True))
    return lst


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
