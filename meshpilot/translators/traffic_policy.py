"""DestinationRule traffic policies: Istio's precedence, and their Envoy form on clusters.

Precedence (Istio's `MergeSubsetTrafficPolicy`, util.go):

1. The rule-level `trafficPolicy`. A `portLevelSettings` entry for the cluster's port
   replaces it *as a whole*: fields the entry omits fall back to defaults, they are not
   inherited from the rule level (Istio's documented behaviour).
2. A subset's `trafficPolicy`, port-resolved the same way. Each of loadBalancer,
   connectionPool, outlierDetection and tls it sets replaces the rule's; when a subset
   port-level entry matches, all four come from that entry.

The cluster conversion follows Istio's `applyTrafficPolicy` (cluster_traffic_policy.go) in
its order: connection pool, HTTP/2 upgrade, outlier detection, load balancer, then TLS
(upstream_tls.py).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TypeAlias

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.v3 import percent_pb2

from meshpilot.api.networking import (
    ClientTLSSettings,
    ConnectionPoolSettings,
    ConsistentHashLB,
    LoadBalancerSettings,
    LocalityLbSetting,
    OutlierDetection,
    Subset,
    TCPSettings,
    TrafficPolicy,
)
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.routing import ResolvedDestinationRule
from meshpilot.model.service import Service
from meshpilot.translators.common import MAX_UINT32, duration, uint32

Cluster: TypeAlias = cluster_pb2.Cluster
HttpProtocolOptions: TypeAlias = http_protocol_options_pb2.HttpProtocolOptions
HashPolicy: TypeAlias = route_components_pb2.RouteAction.HashPolicy

# Envoy's own default when a consistent hash names neither ringHash nor maglev (Istio sets it).
DEFAULT_MINIMUM_RING_SIZE = 1024
# Istio's default MeshConfig has `localityLbSetting: {enabled: true}`: locality failover is
# on wherever outlier detection is set. meshpilot's MeshConfig has no such field yet.
MESH_LOCALITY_LB_SETTING = LocalityLbSetting(enabled=True)


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """The four parts of a traffic policy that apply to one cluster, after merging."""

    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


NO_POLICY = EffectivePolicy()


# --- precedence -------------------------------------------------------------------------


def _port_level(policy: TrafficPolicy | None, port: int) -> tuple[EffectivePolicy | None, bool]:
    """The policy for `port` and whether a port-level entry supplied it."""
    if policy is None:
        return None, False
    for pls in policy.port_level_settings:
        if pls.port is not None and pls.port.number == port:
            return (
                EffectivePolicy(
                    pls.load_balancer, pls.connection_pool, pls.outlier_detection, pls.tls
                ),
                True,
            )
    return (
        EffectivePolicy(
            policy.load_balancer, policy.connection_pool, policy.outlier_detection, policy.tls
        ),
        False,
    )


def merge_traffic_policy(
    rule: TrafficPolicy | None, subset: TrafficPolicy | None, port: int
) -> EffectivePolicy:
    """Istio's MergeSubsetTrafficPolicy for one port."""
    original, _ = _port_level(rule, port)
    if subset is None:
        return original or NO_POLICY
    sub, has_port_level = _port_level(subset, port)
    assert sub is not None
    if original is None or has_port_level:
        return sub
    return EffectivePolicy(
        sub.load_balancer if sub.load_balancer is not None else original.load_balancer,
        sub.connection_pool if sub.connection_pool is not None else original.connection_pool,
        sub.outlier_detection if sub.outlier_detection is not None else original.outlier_detection,
        sub.tls if sub.tls is not None else original.tls,
    )


def find_subset(dr: ResolvedDestinationRule | None, name: str) -> Subset | None:
    if dr is None or not name:
        return None
    for s in dr.spec.subsets:
        if s.name == name:
            return s
    return None


def policy_for(dr: ResolvedDestinationRule | None, subset: str, port: int) -> EffectivePolicy:
    """The merged policy of cluster `outbound|port|subset|host` under `dr`."""
    if dr is None:
        return NO_POLICY
    found = find_subset(dr, subset)
    return merge_traffic_policy(
        dr.spec.traffic_policy, found.traffic_policy if found else None, port
    )


def dr_identity(dr: ResolvedDestinationRule | None) -> Hashable:
    """What tells two DestinationRules apart in cache keys: key and content revision."""
    if dr is None:
        return None
    return (dr.config.namespace, dr.config.name, dr.config.revision)


def locality_lb_setting(policy: EffectivePolicy) -> LocalityLbSetting | None:
    """Istio's GetLocalityLbSetting: the rule's setting wins over the mesh's; either one
    with `enabled: false` turns locality load balancing off."""
    lb = policy.load_balancer
    setting = lb.locality_lb_setting if lb is not None else None
    if setting is not None:
        return None if setting.enabled is False else setting
    mesh = MESH_LOCALITY_LB_SETTING
    return None if mesh.enabled is False else mesh


# --- route hash policy ------------------------------------------------------------------


def hash_policies(
    push: PushContext, proxy: Proxy, service: Service, subset: str, port: int
) -> list[HashPolicy]:
    """RouteAction.hash_policy for a route to `outbound|port|subset|service`; [] unless
    the DestinationRule that applies to `proxy` gives that cluster a consistent hash.

    Derived from the same merged policy as the cluster, so a route hashes exactly when
    its cluster is RING_HASH or MAGLEV.
    """
    dr = push.destination_rule(proxy.namespace, service)
    if dr is None:
        return []
    lb = policy_for(dr, subset, port).load_balancer
    if lb is None or lb.consistent_hash is None:
        return []
    return [hash_policy(lb.consistent_hash)]


def hash_policy(ch: ConsistentHashLB) -> HashPolicy:
    """Istio's consistentHashToHashPolicy."""
    if ch.http_header_name is not None:
        return HashPolicy(header=HashPolicy.Header(header_name=ch.http_header_name))
    if ch.http_cookie is not None:
        cookie = HashPolicy.Cookie(name=ch.http_cookie.name, path=ch.http_cookie.path)
        if ch.http_cookie.ttl is not None:
            # With a ttl Envoy sets the cookie itself when the request has none.
            cookie.ttl.CopyFrom(duration(ch.http_cookie.ttl))
        return HashPolicy(cookie=cookie)
    if ch.http_query_parameter_name is not None:
        return HashPolicy(
            query_parameter=HashPolicy.QueryParameter(name=ch.http_query_parameter_name)
        )
    return HashPolicy(connection_properties=HashPolicy.ConnectionProperties(source_ip=True))


# --- cluster conversion -----------------------------------------------------------------


def apply_connection_pool(
    c: Cluster, opts: HttpProtocolOptions, pool: ConnectionPoolSettings | None
) -> None:
    """Circuit breakers, connect timeout, keepalive and HTTP protocol options.

    Zero means "unset" for the limits, as in Istio (protobuf cannot tell them apart).
    """
    if pool is None:
        return
    # The cluster starts with Istio's default thresholds; the pool overrides some.
    if not c.circuit_breakers.thresholds:
        c.circuit_breakers.thresholds.append(default_thresholds())
    threshold = c.circuit_breakers.thresholds[0]
    idle_timeout: float | None = None
    max_requests_per_connection = 0
    max_concurrent_streams = 0
    max_connection_duration: float | None = None
    http = pool.http
    if http is not None:
        if http.http2_max_requests:
            # Envoy applies max_requests to HTTP/2 (and every request), pending to HTTP/1.
            threshold.max_requests.value = http.http2_max_requests
        if http.http1_max_pending_requests:
            threshold.max_pending_requests.value = http.http1_max_pending_requests
        if http.max_retries:
            threshold.max_retries.value = http.max_retries
        idle_timeout = http.idle_timeout
        max_requests_per_connection = http.max_requests_per_connection or 0
        max_concurrent_streams = http.max_concurrent_streams or 0
    tcp = pool.tcp
    if tcp is not None:
        if tcp.connect_timeout is not None:
            c.connect_timeout.CopyFrom(duration(tcp.connect_timeout))
        if tcp.max_connections:
            threshold.max_connections.value = tcp.max_connections
        max_connection_duration = tcp.max_connection_duration
        if idle_timeout is None:
            idle_timeout = tcp.idle_timeout
        _apply_tcp_keepalive(c, tcp.tcp_keepalive)
    if (
        idle_timeout is not None
        or max_connection_duration is not None
        or max_requests_per_connection
        or max_concurrent_streams
    ):
        common = opts.common_http_protocol_options
        if idle_timeout is not None:
            common.idle_timeout.CopyFrom(duration(idle_timeout))
        if max_requests_per_connection:
            common.max_requests_per_connection.value = max_requests_per_connection
        if max_connection_duration is not None:
            common.max_connection_duration.CopyFrom(duration(max_connection_duration))
        if max_concurrent_streams and is_h2(opts):
            # Only on clusters already HTTP/2 here (Istio upgrades after this step).
            opts.explicit_http_config.http2_protocol_options.max_concurrent_streams.value = (
                max_concurrent_streams
            )
    if http is not None and http.use_client_protocol:
        # Upstream speaks whatever the downstream spoke.
        downstream = opts.use_downstream_protocol_config
        downstream.http_protocol_options.SetInParent()
        downstream.http2_protocol_options.SetInParent()


def default_thresholds() -> circuit_breaker_pb2.CircuitBreakers.Thresholds:
    """Istio's defaults: no limits (Envoy's 1024/3 cause 503s during rollouts)."""
    t = circuit_breaker_pb2.CircuitBreakers.Thresholds(track_remaining=True)
    t.max_connections.value = MAX_UINT32
    t.max_pending_requests.value = MAX_UINT32
    t.max_requests.value = MAX_UINT32
    t.max_retries.value = MAX_UINT32
    return t


def _apply_tcp_keepalive(c: Cluster, keepalive: TCPSettings.TcpKeepalive | None) -> None:
    if keepalive is None:
        return
    # An empty tcp_keepalive turns SO_KEEPALIVE on with the OS defaults.
    ka = c.upstream_connection_options.tcp_keepalive
    ka.SetInParent()
    if keepalive.probes:
        ka.keepalive_probes.value = keepalive.probes
    if keepalive.time is not None:
        ka.keepalive_time.value = int(keepalive.time)
    if keepalive.interval is not None:
        ka.keepalive_interval.value = int(keepalive.interval)


def should_h2_upgrade(pool: ConnectionPoolSettings | None) -> bool:
    """Only an explicit UPGRADE: the mesh-wide h2UpgradePolicy defaults to DO_NOT_UPGRADE."""
    return pool is not None and pool.http is not None and pool.http.h2_upgrade_policy == "UPGRADE"


def set_h2(opts: HttpProtocolOptions) -> None:
    opts.explicit_http_config.http2_protocol_options.SetInParent()


def is_h2(opts: HttpProtocolOptions) -> bool:
    return bool(
        opts.WhichOneof("upstream_protocol_options") == "explicit_http_config"
        and opts.explicit_http_config.HasField("http2_protocol_options")
    )


def apply_outlier_detection(c: Cluster, outlier: OutlierDetection | None) -> None:
    """Istio's applyOutlierDetection, field for field."""
    if outlier is None:
        return
    out = outlier_detection_pb2.OutlierDetection(enforcing_success_rate=uint32(0))
    if outlier.consecutive_errors:
        # The deprecated field counted gateway errors only (istio/api#617).
        out.consecutive_gateway_failure.value = outlier.consecutive_errors
        out.enforcing_consecutive_gateway_failure.value = 100
        out.enforcing_consecutive_5xx.value = 0
    if outlier.consecutive_5xx_errors is not None:
        v = outlier.consecutive_5xx_errors
        out.consecutive_5xx.value = v
        out.enforcing_consecutive_5xx.value = 100 if v > 0 else 0
    if outlier.consecutive_gateway_errors is not None:
        v = outlier.consecutive_gateway_errors
        out.consecutive_gateway_failure.value = v
        out.enforcing_consecutive_gateway_failure.value = 100 if v > 0 else 0
    if outlier.interval is not None:
        out.interval.CopyFrom(duration(outlier.interval))
    if outlier.base_ejection_time is not None:
        out.base_ejection_time.CopyFrom(duration(outlier.base_ejection_time))
    if outlier.max_ejection_percent:
        out.max_ejection_percent.value = outlier.max_ejection_percent
    if outlier.split_external_local_origin_errors:
        out.split_external_local_origin_errors = True
        if outlier.consecutive_local_origin_failures:
            out.consecutive_local_origin_failure.value = outlier.consecutive_local_origin_failures
            out.enforcing_consecutive_local_origin_failure.value = 100
        out.enforcing_local_origin_success_rate.value = 0
    c.outlier_detection.CopyFrom(out)
    # Istio always sets the panic threshold here, 0 (panic mode off) unless given: with
    # few pods per service Envoy's 50% would send traffic to ejected hosts.
    c.common_lb_config.healthy_panic_threshold.CopyFrom(
        percent_pb2.Percent(value=float(outlier.min_health_percent or 0))
    )


def apply_load_balancer(
    c: Cluster, lb: LoadBalancerSettings | None, locality_setting: LocalityLbSetting | None
) -> None:
    """Istio's applyLoadBalancer; the locality part of an inline load assignment is done
    by the caller, which knows the endpoints."""
    if c.type == Cluster.ORIGINAL_DST:
        c.lb_policy = Cluster.CLUSTER_PROVIDED
        return
    if locality_setting is not None:
        failover = c.HasField("outlier_detection") and bool(
            locality_setting.failover or locality_setting.failover_priority
        )
        if locality_setting.distribute or failover:
            # Locality weights only count with this set; without it they would also skew
            # least-request, so Istio sets it only when weights or failover lists apply.
            c.common_lb_config.locality_weighted_lb_config.SetInParent()
    simple = lb.simple if lb is not None else None
    if simple == "PASSTHROUGH":
        c.type = Cluster.ORIGINAL_DST
        c.lb_policy = Cluster.CLUSTER_PROVIDED
        c.ClearField("load_assignment")
        c.ClearField("eds_cluster_config")
        c.common_lb_config.ClearField("locality_weighted_lb_config")
        return
    if simple == "RANDOM":
        c.lb_policy = Cluster.RANDOM
    elif simple == "ROUND_ROBIN":
        c.lb_policy = Cluster.ROUND_ROBIN
        if lb is not None and lb.warmup_duration_secs is not None:
            c.round_robin_lb_config.slow_start_config.slow_start_window.CopyFrom(
                duration(lb.warmup_duration_secs)
            )
    else:
        # LEAST_REQUEST, its old name LEAST_CONN, and Istio's default for unset.
        c.lb_policy = Cluster.LEAST_REQUEST
        if lb is not None and lb.warmup_duration_secs is not None:
            c.least_request_lb_config.slow_start_config.slow_start_window.CopyFrom(
                duration(lb.warmup_duration_secs)
            )
    if lb is not None and lb.consistent_hash is not None:
        _apply_consistent_hash(c, lb.consistent_hash)


def _apply_consistent_hash(c: Cluster, ch: ConsistentHashLB) -> None:
    """Istio's ApplyRingHashLoadBalancer."""
    if ch.maglev is not None:
        c.lb_policy = Cluster.MAGLEV
        if ch.maglev.table_size:
            c.maglev_lb_config.table_size.value = ch.maglev.table_size
        else:
            c.ClearField("maglev_lb_config")
        return
    c.lb_policy = Cluster.RING_HASH
    if ch.ring_hash is not None:
        if ch.ring_hash.minimum_ring_size:
            c.ring_hash_lb_config.minimum_ring_size.value = ch.ring_hash.minimum_ring_size
        else:
            c.ClearField("ring_hash_lb_config")
        return
    # The deprecated top-level minimumRingSize, else Envoy's default made explicit.
    c.ring_hash_lb_config.minimum_ring_size.value = (
        ch.minimum_ring_size or DEFAULT_MINIMUM_RING_SIZE
    )


# --- metadata ---------------------------------------------------------------------------


def add_config_metadata(md: base_pb2.Metadata, dr: ResolvedDestinationRule, subset: str) -> None:
    """Istio's AddConfigInfoMetadata/AddSubsetToMetadata: which rule shaped a cluster."""
    fields = md.filter_metadata["istio"].fields
    fields["config"].string_value = (
        f"/apis/networking.istio.io/v1/namespaces/{dr.config.namespace}"
        f"/destination-rule/{dr.config.name}"
    )
    if subset:
        fields["subset"].string_value = subset
