"""DestinationRules: subset clusters and their endpoints, Istio's policy precedence, and
the Envoy form of loadBalancer, connectionPool, outlierDetection and tls."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from meshpilot.api.networking import TrafficPolicy
from meshpilot.model.proxy import Locality
from meshpilot.model.push_context import PushContext
from meshpilot.translators.clusters import build_clusters
from meshpilot.translators.destinations import outbound_cluster_names
from meshpilot.translators.endpoints import build_load_assignment, eds_cache_key
from meshpilot.translators.traffic_policy import hash_policies, merge_traffic_policy
from tests.samples import ISTIO_SAMPLES

from ._helpers import RATINGS, REVIEWS, by_name, push_of, router, sidecar, unpack

C = cluster_pb2.Cluster
HP = route_components_pb2.RouteAction.HashPolicy
OPTS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
MAX = 2**32 - 1

SAMPLES = ISTIO_SAMPLES
BOOKINFO_NET = SAMPLES / "bookinfo/networking"

# reviews-v3 and ratings-v2 join the base mesh so that every subset has something.
MORE_WORKLOADS = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v3, namespace: default}
spec: {address: 10.0.0.4, labels: {app: reviews, version: v3}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-v2, namespace: default}
spec: {address: 10.0.0.5, labels: {app: ratings, version: v2}}
"""


def sample(name: str) -> str:
    path = BOOKINFO_NET / name
    assert path.is_file(), f"Istio sample missing: {path} (tests/data/istio-samples)"
    return path.read_text()


def dr(spec: str, name: str = "reviews", namespace: str = "default") -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}, namespace: {namespace}}}
spec:
{spec}
"""


def clusters_of(push: PushContext, **proxy: object) -> dict[str, cluster_pb2.Cluster]:
    return by_name(build_clusters(push, sidecar(**proxy)))  # type: ignore[arg-type]


def addresses(cla: endpoint_pb2.ClusterLoadAssignment) -> list[str]:
    return [
        e.endpoint.address.socket_address.address for loc in cla.endpoints for e in loc.lb_endpoints
    ]


def http_options(c: cluster_pb2.Cluster) -> http_protocol_options_pb2.HttpProtocolOptions:
    assert OPTS_KEY in c.typed_extension_protocol_options, c.name
    return unpack(
        c.typed_extension_protocol_options[OPTS_KEY],
        http_protocol_options_pb2.HttpProtocolOptions,
    )


def tls_context(c: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext:
    assert c.transport_socket.name == "envoy.transport_sockets.tls"
    return unpack(c.transport_socket.typed_config, tls_pb2.UpstreamTlsContext)


# --- Istio's own samples, unchanged ---------------------------------------------------------


def test_bookinfo_destination_rule_all_subset_clusters_and_endpoints() -> None:
    push = push_of(MORE_WORKLOADS, sample("destination-rule-all.yaml"))
    proxy = sidecar()
    clusters = by_name(build_clusters(push, proxy))
    for subset in ("", "v1", "v2", "v3"):
        c = clusters[f"outbound|9080|{subset}|{REVIEWS}"]
        assert c.type == C.EDS
        assert c.eds_cluster_config.service_name == c.name
        assert c.alt_stat_name == c.name + ";"
        assert c.lb_policy == C.LEAST_REQUEST
    for subset in ("v1", "v2", "v2-mysql", "v2-mysql-vm"):
        assert f"outbound|9080|{subset}|{RATINGS}" in clusters
    md = clusters[f"outbound|9080|v2|{REVIEWS}"].metadata.filter_metadata["istio"]
    assert md["subset"] == "v2"
    assert (
        md["config"] == "/apis/networking.istio.io/v1/namespaces/default/destination-rule/reviews"
    )
    assert "subset" not in clusters[f"outbound|9080||{REVIEWS}"].metadata.filter_metadata["istio"]

    def cla(name: str) -> list[str]:
        return addresses(build_load_assignment(push, proxy, name))

    assert cla(f"outbound|9080||{REVIEWS}") == ["10.0.0.1", "10.0.0.2", "10.0.0.4"]
    assert cla(f"outbound|9080|v1|{REVIEWS}") == ["10.0.0.1"]
    assert cla(f"outbound|9080|v2|{REVIEWS}") == ["10.0.0.2"]
    assert cla(f"outbound|9080|v3|{REVIEWS}") == ["10.0.0.4"]
    assert cla(f"outbound|9080|v2|{RATINGS}") == ["10.0.0.5"]
    assert cla(f"outbound|9080|v2-mysql|{RATINGS}") == []
    # ratings-v1 has no version label: only the default cluster has it.
    assert cla(f"outbound|9080|v1|{RATINGS}") == []
    assert cla(f"outbound|9080||{RATINGS}") == ["10.0.0.3", "10.0.0.5"]


def test_bookinfo_destination_rule_reviews_random() -> None:
    push = push_of(sample("destination-rule-reviews.yaml"))
    clusters = clusters_of(push)
    for subset in ("", "v1", "v2", "v3"):
        assert clusters[f"outbound|9080|{subset}|{REVIEWS}"].lb_policy == C.RANDOM
    assert clusters[f"outbound|9080||{RATINGS}"].lb_policy == C.LEAST_REQUEST


def test_outbound_cluster_names_are_exactly_the_outbound_clusters() -> None:
    push = push_of(MORE_WORKLOADS, sample("destination-rule-all.yaml"))
    for proxy in (sidecar(), sidecar(namespace="other", labels={}), router()):
        built = {c.name for c in build_clusters(push, proxy) if c.name.startswith("outbound|")}
        assert outbound_cluster_names(push, proxy) == frozenset(built)
    names = outbound_cluster_names(push, sidecar())
    assert f"outbound|9080|v3|{REVIEWS}" in names
    assert f"outbound|9080|v4|{REVIEWS}" not in names
    assert "outbound|5353||greeter.default.svc.cluster.local" not in names  # UDP


# --- which rule applies ------------------------------------------------------------------


def test_rule_in_client_namespace_wins_and_scopes_subsets() -> None:
    push = push_of(
        dr(
            f"""  host: {REVIEWS}
  subsets: [{{name: canary, labels: {{version: v2}}}}]""",
            namespace="other",
        ),
        dr("""  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]"""),
    )
    default_proxy = sidecar()
    other_proxy = sidecar(namespace="other", labels={})
    assert f"outbound|9080|v1|{REVIEWS}" in outbound_cluster_names(push, default_proxy)
    assert f"outbound|9080|canary|{REVIEWS}" not in outbound_cluster_names(push, default_proxy)
    assert f"outbound|9080|canary|{REVIEWS}" in outbound_cluster_names(push, other_proxy)
    assert f"outbound|9080|v1|{REVIEWS}" not in outbound_cluster_names(push, other_proxy)
    canary = f"outbound|9080|canary|{REVIEWS}"
    assert addresses(build_load_assignment(push, other_proxy, canary)) == ["10.0.0.2"]
    # Another namespace's proxy never gets a subset its own rule does not define.
    assert addresses(build_load_assignment(push, default_proxy, canary)) == []
    assert eds_cache_key(push, default_proxy, canary) != eds_cache_key(push, other_proxy, canary)


def test_eds_key_shared_where_the_rule_does_not_matter() -> None:
    push = push_of(
        dr("""  host: reviews
  subsets: [{name: v1, labels: {version: v1}}]""")
    )
    a = sidecar()
    b = sidecar(ip="10.0.0.9", name="other-pod", labels={"app": "x"})
    c = sidecar(namespace="other", labels={})
    default = f"outbound|9080||{REVIEWS}"
    assert (
        eds_cache_key(push, a, default)
        == eds_cache_key(push, c, default)
        == ("eds", default, None, None)
    )
    v1 = f"outbound|9080|v1|{REVIEWS}"
    assert eds_cache_key(push, a, v1) == eds_cache_key(push, b, v1)
    assert eds_cache_key(push, a, v1)[:2] == ("eds", v1)


# --- precedence ----------------------------------------------------------------------------

PRECEDENCE = dr("""  host: reviews
  trafficPolicy:
    loadBalancer: {simple: RANDOM}
    outlierDetection: {consecutive5xxErrors: 7}
    connectionPool: {tcp: {maxConnections: 10}}
    portLevelSettings:
    - port: {number: 9080}
      connectionPool: {tcp: {maxConnections: 20}}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      loadBalancer: {simple: ROUND_ROBIN}
      portLevelSettings:
      - port: {number: 9080}
        outlierDetection: {consecutive5xxErrors: 3}""")


def test_port_level_settings_replace_the_rule_level_policy_whole() -> None:
    clusters = clusters_of(push_of(PRECEDENCE))
    c = clusters[f"outbound|9080||{REVIEWS}"]
    assert c.circuit_breakers.thresholds[0].max_connections.value == 20
    # Istio: port-level policies do not inherit; unset parts fall back to defaults.
    assert c.lb_policy == C.LEAST_REQUEST
    assert not c.HasField("outlier_detection")


def test_subset_without_policy_uses_the_port_resolved_rule_policy() -> None:
    c = clusters_of(push_of(PRECEDENCE))[f"outbound|9080|v1|{REVIEWS}"]
    assert c.circuit_breakers.thresholds[0].max_connections.value == 20
    assert c.lb_policy == C.LEAST_REQUEST


def test_subset_policy_overrides_the_parts_it_sets() -> None:
    c = clusters_of(push_of(PRECEDENCE))[f"outbound|9080|v2|{REVIEWS}"]
    assert c.lb_policy == C.ROUND_ROBIN
    assert c.circuit_breakers.thresholds[0].max_connections.value == 20


def test_subset_port_level_replaces_all_four_parts() -> None:
    c = clusters_of(push_of(PRECEDENCE))[f"outbound|9080|v3|{REVIEWS}"]
    assert c.outlier_detection.consecutive_5xx.value == 3
    assert c.lb_policy == C.LEAST_REQUEST  # the subset's own ROUND_ROBIN is not inherited
    assert c.circuit_breakers.thresholds[0].max_connections.value == MAX


def test_merge_traffic_policy_other_port_keeps_rule_level() -> None:
    rule = TrafficPolicy.model_validate(
        {
            "loadBalancer": {"simple": "RANDOM"},
            "tls": {"mode": "SIMPLE"},
            "portLevelSettings": [{"port": {"number": 80}, "tls": {"mode": "DISABLE"}}],
        }
    )
    subset = TrafficPolicy.model_validate({"connectionPool": {"tcp": {"maxConnections": 1}}})
    on_443 = merge_traffic_policy(rule, subset, 443)
    assert on_443.load_balancer is not None and on_443.load_balancer.simple == "RANDOM"
    assert on_443.tls is not None and on_443.tls.mode == "SIMPLE"
    assert on_443.connection_pool is subset.connection_pool
    on_80 = merge_traffic_policy(rule, subset, 80)
    assert on_80.load_balancer is None
    assert on_80.tls is not None and on_80.tls.mode == "DISABLE"
    assert merge_traffic_policy(None, None, 80).tls is None


# --- load balancer ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("simple", "expected"),
    [
        ("ROUND_ROBIN", C.ROUND_ROBIN),
        ("LEAST_REQUEST", C.LEAST_REQUEST),
        ("LEAST_CONN", C.LEAST_REQUEST),
        ("RANDOM", C.RANDOM),
        ("UNSPECIFIED", C.LEAST_REQUEST),
    ],
)
def test_simple_load_balancers(simple: str, expected: int) -> None:
    push = push_of(dr(f"  host: reviews\n  trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}"))
    c = clusters_of(push)[f"outbound|9080||{REVIEWS}"]
    assert c.lb_policy == expected
    assert not c.HasField("ring_hash_lb_config")
    assert hash_policies(push, sidecar(), push.services[REVIEWS], "", 9080) == []


def test_passthrough_load_balancer_is_original_dst() -> None:
    push = push_of(dr("  host: reviews\n  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}"))
    c = clusters_of(push)[f"outbound|9080||{REVIEWS}"]
    assert c.type == C.ORIGINAL_DST
    assert c.lb_policy == C.CLUSTER_PROVIDED
    assert not c.HasField("eds_cluster_config")
    assert not c.HasField("load_assignment")


def test_warmup_duration_is_slow_start() -> None:
    push = push_of(
        dr("""  host: reviews
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 30s}}
  subsets:
  - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {warmupDurationSecs: 5s}}}""")
    )
    clusters = clusters_of(push)
    rr = clusters[f"outbound|9080||{REVIEWS}"]
    assert rr.round_robin_lb_config.slow_start_config.slow_start_window.seconds == 30
    lr = clusters[f"outbound|9080|v1|{REVIEWS}"]
    assert lr.lb_policy == C.LEAST_REQUEST
    assert lr.least_request_lb_config.slow_start_config.slow_start_window.seconds == 5


@pytest.mark.parametrize(
    ("hash_spec", "expected"),
    [
        ("{httpHeaderName: x-user}", HP(header=HP.Header(header_name="x-user"))),
        (
            "{httpCookie: {name: session, path: /, ttl: 1h}}",
            HP(cookie=HP.Cookie(name="session", path="/", ttl={"seconds": 3600})),
        ),
        ("{httpCookie: {name: session}}", HP(cookie=HP.Cookie(name="session"))),
        ("{useSourceIp: true}", HP(connection_properties=HP.ConnectionProperties(source_ip=True))),
        ("{httpQueryParameterName: user}", HP(query_parameter=HP.QueryParameter(name="user"))),
    ],
)
def test_consistent_hash_ring_hash_and_route_hash_policy(hash_spec: str, expected: HP) -> None:
    push = push_of(
        dr(f"  host: reviews\n  trafficPolicy: {{loadBalancer: {{consistentHash: {hash_spec}}}}}")
    )
    c = clusters_of(push)[f"outbound|9080||{REVIEWS}"]
    assert c.lb_policy == C.RING_HASH
    assert c.ring_hash_lb_config.minimum_ring_size.value == 1024
    assert hash_policies(push, sidecar(), push.services[REVIEWS], "", 9080) == [expected]


def test_ring_hash_sizes_and_maglev() -> None:
    push = push_of(
        dr("""  host: reviews
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-a, ringHash: {minimumRingSize: 4096}}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65537}}}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: x-b, minimumRingSize: 2048}}
  - name: v3
    labels: {version: v3}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: x-c, maglev: {}}}""")
    )
    clusters = clusters_of(push)
    default = clusters[f"outbound|9080||{REVIEWS}"]
    assert default.lb_policy == C.RING_HASH
    assert default.ring_hash_lb_config.minimum_ring_size.value == 4096
    v1 = clusters[f"outbound|9080|v1|{REVIEWS}"]
    assert v1.lb_policy == C.MAGLEV
    assert v1.maglev_lb_config.table_size.value == 65537
    v2 = clusters[f"outbound|9080|v2|{REVIEWS}"]
    assert v2.ring_hash_lb_config.minimum_ring_size.value == 2048
    v3 = clusters[f"outbound|9080|v3|{REVIEWS}"]
    assert v3.lb_policy == C.MAGLEV and not v3.HasField("maglev_lb_config")
    svc = push.services[REVIEWS]
    proxy = sidecar()
    assert hash_policies(push, proxy, svc, "v1", 9080) == [
        HP(connection_properties=HP.ConnectionProperties(source_ip=True))
    ]
    assert hash_policies(push, proxy, svc, "v3", 9080) == [HP(header=HP.Header(header_name="x-c"))]
    assert hash_policies(push, proxy, svc, "", 9080) == [HP(header=HP.Header(header_name="x-a"))]


def test_hash_policies_follow_the_rule_that_applies_to_the_proxy() -> None:
    push = push_of(
        dr(
            "  host: reviews\n  exportTo: [.]\n"
            "  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-a}}}"
        )
    )
    svc = push.services[REVIEWS]
    assert hash_policies(push, sidecar(), svc, "", 9080)
    assert hash_policies(push, sidecar(namespace="other", labels={}), svc, "", 9080) == []
    assert hash_policies(push, sidecar(), push.services[RATINGS], "", 9080) == []


# --- connection pool -------------------------------------------------------------------------

POOL = dr("""  host: reviews
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 250ms
        tcpKeepalive: {probes: 3, time: 7200s, interval: 75s}
        maxConnectionDuration: 1h
      http:
        http1MaxPendingRequests: 5
        http2MaxRequests: 50
        maxRequestsPerConnection: 10
        maxRetries: 2
        idleTimeout: 30s""")


def test_connection_pool_conversion() -> None:
    c = clusters_of(push_of(POOL))[f"outbound|9080||{REVIEWS}"]
    (t,) = c.circuit_breakers.thresholds
    assert (t.max_connections.value, t.max_pending_requests.value) == (100, 5)
    assert (t.max_requests.value, t.max_retries.value) == (50, 2)
    assert t.track_remaining
    assert (c.connect_timeout.seconds, c.connect_timeout.nanos) == (0, 250_000_000)
    ka = c.upstream_connection_options.tcp_keepalive
    assert (ka.keepalive_probes.value, ka.keepalive_time.value, ka.keepalive_interval.value) == (
        3,
        7200,
        75,
    )
    opts = http_options(c)
    common = opts.common_http_protocol_options
    assert common.max_requests_per_connection.value == 10
    assert common.idle_timeout.seconds == 30
    assert common.max_connection_duration.seconds == 3600
    # Envoy needs a protocol choice once the options exist: HTTP/1.1 for an HTTP port.
    assert opts.explicit_http_config.HasField("http_protocol_options")


def test_connection_pool_defaults_where_unset() -> None:
    push = push_of(
        dr("  host: reviews\n  trafficPolicy: {connectionPool: {http: {maxRetries: 0}}}")
    )
    c = clusters_of(push)[f"outbound|9080||{REVIEWS}"]
    (t,) = c.circuit_breakers.thresholds
    assert (t.max_connections.value, t.max_pending_requests.value) == (MAX, MAX)
    assert (t.max_requests.value, t.max_retries.value) == (MAX, MAX)
    assert c.connect_timeout.seconds == 10
    assert not c.HasField("upstream_connection_options")
    assert OPTS_KEY not in c.typed_extension_protocol_options


def test_empty_keepalive_turns_so_keepalive_on() -> None:
    push = push_of(
        dr("  host: reviews\n  trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {}}}}")
    )
    c = clusters_of(push)[f"outbound|9080||{REVIEWS}"]
    assert c.upstream_connection_options.HasField("tcp_keepalive")
    assert not c.upstream_connection_options.tcp_keepalive.HasField("keepalive_time")


def test_h2_upgrade_and_client_protocol() -> None:
    push = push_of(
        dr("""  host: reviews
  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy: {connectionPool: {http: {useClientProtocol: true}}}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {connectionPool: {http: {useClientProtocol: true, h2UpgradePolicy: UPGRADE}}}
  - name: v3
    labels: {version: v3}
    trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: DO_NOT_UPGRADE}}}""")
    )
    clusters = clusters_of(push)
    up = http_options(clusters[f"outbound|9080||{REVIEWS}"])
    assert up.explicit_http_config.HasField("http2_protocol_options")
    client = http_options(clusters[f"outbound|9080|v1|{REVIEWS}"])
    assert client.use_downstream_protocol_config.HasField("http_protocol_options")
    assert client.use_downstream_protocol_config.HasField("http2_protocol_options")
    # Istio applies the upgrade after the pool: it wins over useClientProtocol.
    both = http_options(clusters[f"outbound|9080|v2|{REVIEWS}"])
    assert both.explicit_http_config.HasField("http2_protocol_options")
    assert OPTS_KEY not in clusters[f"outbound|9080|v3|{REVIEWS}"].typed_extension_protocol_options


def test_grpc_port_keeps_http2_with_pool_options() -> None:
    push = push_of(
        dr(
            "  host: greeter\n  trafficPolicy: {connectionPool: {http: {idleTimeout: 5s, "
            "maxConcurrentStreams: 9}}}",
            name="greeter",
        )
    )
    c = clusters_of(push)["outbound|7070||greeter.default.svc.cluster.local"]
    opts = http_options(c)
    assert opts.explicit_http_config.http2_protocol_options.max_concurrent_streams.value == 9
    assert opts.common_http_protocol_options.idle_timeout.seconds == 5


# --- outlier detection -------------------------------------------------------------------------


def test_outlier_detection_conversion() -> None:
    push = push_of(
        dr("""  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 5
      consecutiveGatewayErrors: 3
      interval: 10s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
      minHealthPercent: 25
      splitExternalLocalOriginErrors: true
      consecutiveLocalOriginFailures: 4""")
    )
    c = clusters_of(push)[f"outbound|9080||{REVIEWS}"]
    od = c.outlier_detection
    assert (od.consecutive_5xx.value, od.enforcing_consecutive_5xx.value) == (5, 100)
    assert (
        od.consecutive_gateway_failure.value,
        od.enforcing_consecutive_gateway_failure.value,
    ) == (
        3,
        100,
    )
    assert od.HasField("enforcing_success_rate") and od.enforcing_success_rate.value == 0
    assert od.interval.seconds == 10 and od.base_ejection_time.seconds == 30
    assert od.max_ejection_percent.value == 50
    assert od.split_external_local_origin_errors
    assert od.consecutive_local_origin_failure.value == 4
    assert od.enforcing_consecutive_local_origin_failure.value == 100
    assert od.HasField("enforcing_local_origin_success_rate")
    assert c.common_lb_config.healthy_panic_threshold.value == 25


def test_outlier_detection_zero_disables_enforcing_and_panic_threshold_is_zero() -> None:
    push = push_of(
        dr("  host: reviews\n  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 0}}")
    )
    c = clusters_of(push)[f"outbound|9080||{REVIEWS}"]
    od = c.outlier_detection
    assert od.HasField("consecutive_5xx") and od.consecutive_5xx.value == 0
    assert od.HasField("enforcing_consecutive_5xx") and od.enforcing_consecutive_5xx.value == 0
    assert not od.HasField("consecutive_gateway_failure")
    assert not od.HasField("interval")
    # Set even when not given: Istio turns Envoy's panic mode (50%) off.
    assert c.common_lb_config.HasField("healthy_panic_threshold")
    assert c.common_lb_config.healthy_panic_threshold.value == 0


def test_no_outlier_detection_without_rule() -> None:
    c = clusters_of(push_of())[f"outbound|9080||{REVIEWS}"]
    assert not c.HasField("outlier_detection")
    assert not c.common_lb_config.HasField("healthy_panic_threshold")


# --- TLS origination -----------------------------------------------------------------------------

TLS = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: default}
spec:
  host: api.example.com
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: /etc/certs/ca.pem
      sni: api.example.com
      subjectAltNames: [api.example.com, "spiffe://example.com/sa/api", 10.1.2.3]
      caCrl: /etc/certs/crl.pem
  subsets:
  - name: mutual
    trafficPolicy:
      tls:
        mode: MUTUAL
        clientCertificate: /etc/certs/client.pem
        privateKey: /etc/certs/client-key.pem
        caCertificates: /etc/certs/ca.pem
  - name: insecure
    trafficPolicy: {tls: {mode: SIMPLE, insecureSkipVerify: true}}
  - name: system
    trafficPolicy: {tls: {mode: SIMPLE}}
  - name: istio
    trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
  - name: credential
    trafficPolicy: {tls: {mode: SIMPLE, credentialName: api-cert}}
  - name: plain
    trafficPolicy: {tls: {mode: DISABLE}}
"""


def test_tls_simple_with_ca_file_sni_and_typed_sans() -> None:
    c = clusters_of(push_of(TLS))["outbound|443||api.example.com"]
    ctx = tls_context(c)
    assert ctx.sni == "api.example.com"
    common = ctx.common_tls_context
    assert common.tls_params.tls_minimum_protocol_version == common_pb2.TlsParameters.TLSv1_2
    assert common.tls_params.tls_maximum_protocol_version == common_pb2.TlsParameters.TLSv1_3
    assert not common.tls_certificates
    vc = common.validation_context
    assert vc.trusted_ca.filename == "/etc/certs/ca.pem"
    assert vc.crl.filename == "/etc/certs/crl.pem"
    SAN = common_pb2.SubjectAltNameMatcher
    assert [(m.san_type, m.matcher.exact) for m in vc.match_typed_subject_alt_names] == [
        (SAN.DNS, "api.example.com"),
        (SAN.URI, "spiffe://example.com/sa/api"),
        (SAN.IP_ADDRESS, "10.1.2.3"),
    ]
    assert not vc.match_subject_alt_names  # deprecated in Envoy
    # An explicit SNI: no auto SNI, no HttpProtocolOptions at all.
    assert OPTS_KEY not in c.typed_extension_protocol_options


def test_tls_mutual_with_certificate_files() -> None:
    c = clusters_of(push_of(TLS))["outbound|443|mutual|api.example.com"]
    common = tls_context(c).common_tls_context
    (cert,) = common.tls_certificates
    assert cert.certificate_chain.filename == "/etc/certs/client.pem"
    assert cert.private_key.filename == "/etc/certs/client-key.pem"
    assert common.validation_context.trusted_ca.filename == "/etc/certs/ca.pem"
    # No SNI and no SANs given: the request's host is the SNI and is verified.
    upstream = http_options(c).upstream_http_protocol_options
    assert upstream.auto_sni and upstream.auto_san_validation


def test_tls_insecure_skip_verify_and_system_roots() -> None:
    clusters = clusters_of(push_of(TLS))
    insecure = clusters["outbound|443|insecure|api.example.com"]
    vc = tls_context(insecure).common_tls_context.validation_context
    assert not vc.HasField("trusted_ca") and not vc.HasField("system_root_certs")
    upstream = http_options(insecure).upstream_http_protocol_options
    assert upstream.auto_sni and not upstream.auto_san_validation
    system = clusters["outbound|443|system|api.example.com"]
    assert tls_context(system).common_tls_context.validation_context.HasField("system_root_certs")


@pytest.mark.parametrize("subset", ["credential", "plain"])
def test_tls_modes_without_transport_socket(subset: str) -> None:
    c = clusters_of(push_of(TLS))[f"outbound|443|{subset}|api.example.com"]
    assert not c.HasField("transport_socket")


def test_tls_on_http2_cluster_advertises_h2() -> None:
    push = push_of(dr("  host: greeter\n  trafficPolicy: {tls: {mode: SIMPLE, sni: g}}", name="g"))
    c = clusters_of(push)["outbound|7070||greeter.default.svc.cluster.local"]
    assert list(tls_context(c).common_tls_context.alpn_protocols) == ["h2"]


# --- DNS clusters -------------------------------------------------------------------------

DNS_SUBSETS = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pool, namespace: default}
spec:
  hosts: [pool.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - {address: a.pool.example.com, labels: {version: v1}}
  - {address: b.pool.example.com, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pool, namespace: default}
spec:
  host: pool.example.com
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""


def test_dns_subset_clusters_carry_filtered_endpoints() -> None:
    clusters = clusters_of(push_of(DNS_SUBSETS))

    def hosts(name: str) -> list[str]:
        return addresses(clusters[name].load_assignment)

    assert hosts("outbound|80||pool.example.com") == ["a.pool.example.com", "b.pool.example.com"]
    assert hosts("outbound|80|v1|pool.example.com") == ["a.pool.example.com"]
    assert hosts("outbound|80|v2|pool.example.com") == ["b.pool.example.com"]
    v2 = clusters["outbound|80|v2|pool.example.com"]
    assert v2.type == C.STRICT_DNS
    assert v2.load_assignment.cluster_name == v2.name


# --- real Envoy ------------------------------------------------------------------------------


def _write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a client certificate it signed, and an empty CRL, as PEM files."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_name)
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = {
        "ca": (ca.public_bytes(pem)),
        "cert": cert.public_bytes(pem),
        "key": key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        "crl": crl.public_bytes(pem),
    }
    out = {}
    for name, data in files.items():
        path = directory / f"{name}.pem"
        path.write_bytes(data)
        out[name] = path
    return out


def every_policy(pki: dict[str, Path]) -> str:
    """DestinationRules that set every field meshpilot converts, on EDS and DNS hosts."""
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash: {{httpCookie: {{name: s, path: /, ttl: 10s}}}}
      localityLbSetting:
        failover: [{{from: us-east, to: eu}}]
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 2s
        tcpKeepalive: {{probes: 3, time: 60s, interval: 10s}}
        maxConnectionDuration: 10m
        idleTimeout: 1m
      http:
        http1MaxPendingRequests: 10
        http2MaxRequests: 100
        maxRequestsPerConnection: 5
        maxRetries: 3
        idleTimeout: 30s
    outlierDetection:
      consecutive5xxErrors: 5
      consecutiveGatewayErrors: 2
      interval: 5s
      baseEjectionTime: 30s
      maxEjectionPercent: 50
      minHealthPercent: 10
      splitExternalLocalOriginErrors: true
      consecutiveLocalOriginFailures: 3
    tls:
      mode: SIMPLE
      caCertificates: {pki["ca"]}
      caCrl: {pki["crl"]}
      sni: reviews.example.com
      subjectAltNames: [reviews.example.com, "spiffe://cluster.local/ns/default/sa/reviews"]
  subsets:
  - name: v1
    labels: {{version: v1}}
    trafficPolicy:
      tls:
        mode: MUTUAL
        clientCertificate: {pki["cert"]}
        privateKey: {pki["key"]}
        caCertificates: {pki["ca"]}
  - name: v2
    labels: {{version: v2}}
    trafficPolicy:
      loadBalancer: {{simple: ROUND_ROBIN, warmupDurationSecs: 20s}}
      connectionPool: {{http: {{h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 10}}}}
      tls: {{mode: SIMPLE, insecureSkipVerify: true}}
  - name: v3
    labels: {{version: v3}}
    trafficPolicy:
      loadBalancer:
        consistentHash: {{useSourceIp: true, maglev: {{tableSize: 65537}}}}
        localityLbSetting:
          distribute: [{{from: "us-east/*", to: {{"us-east/*": 70, "eu/*": 30}}}}]
      connectionPool: {{http: {{useClientProtocol: true}}}}
      tls: {{mode: SIMPLE}}
  - name: lr
    labels: {{version: v1}}
    trafficPolicy:
      loadBalancer:
        simple: LEAST_REQUEST
        warmupDurationSecs: 5s
        localityLbSetting: {{failoverPriority: [version]}}
      portLevelSettings:
      - port: {{number: 9080}}
        loadBalancer:
          consistentHash: {{httpQueryParameterName: u, ringHash: {{minimumRingSize: 64}}}}
        outlierDetection: {{consecutive5xxErrors: 0}}
  - name: passthrough
    trafficPolicy: {{loadBalancer: {{simple: PASSTHROUGH}}}}
  - name: random
    trafficPolicy: {{loadBalancer: {{simple: RANDOM, localityLbSetting: {{enabled: false}}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: greeter, namespace: default}}
spec:
  host: greeter
  trafficPolicy:
    tls: {{mode: SIMPLE, caCertificates: {pki["ca"]}}}
    connectionPool: {{http: {{maxConcurrentStreams: 50}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: api, namespace: default}}
spec:
  host: api.example.com
  trafficPolicy:
    tls: {{mode: MUTUAL, clientCertificate: {pki["cert"]}, privateKey: {pki["key"]}}}
    outlierDetection: {{consecutiveGatewayErrors: 1}}
    loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: legacy, namespace: default}}
spec:
  host: legacy.example.com
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1}}
    connectionPool: {{tcp: {{maxConnections: 1}}}}
  subsets: [{{name: one}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: default}}
spec:
  host: db.internal
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1}}
    loadBalancer: {{simple: RANDOM}}
"""


def test_envoy_accepts_clusters_and_assignments_with_every_policy(tmp_path: Path) -> None:
    from ._helpers import envoy_validate, static_cluster_for

    push = push_of(MORE_WORKLOADS, every_policy(_write_pki(tmp_path)))
    proxy = dataclasses.replace(sidecar(), locality=Locality("us-east", "a", ""))
    clusters = build_clusters(push, proxy)
    named = by_name(clusters)
    # Everything this test means to exercise is really there.
    assert named[f"outbound|9080|v1|{REVIEWS}"].HasField("transport_socket")
    assert named[f"outbound|9080|v3|{REVIEWS}"].lb_policy == C.MAGLEV
    assert named[f"outbound|9080|lr|{REVIEWS}"].lb_policy == C.RING_HASH
    assert named[f"outbound|9080|passthrough|{REVIEWS}"].type == C.ORIGINAL_DST
    assert named["outbound|443||api.example.com"].type == C.STRICT_DNS
    clas = [
        build_load_assignment(push, proxy, c.name)
        for c in clusters
        if c.type == C.EDS and c.name.startswith("outbound|")
    ]
    assert any(loc.priority > 0 for cla in clas for loc in cla.endpoints)
    envoy_validate(
        clusters=[*clusters, *(static_cluster_for(cla) for cla in clas)], node_id=proxy.id
    )


def test_istio_circuit_breaking_task_rule() -> None:
    """The DestinationRule of Istio's circuit-breaking task, as Envoy must get it."""
    push = push_of(
        dr(
            """  host: ratings
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100""",
            name="ratings",
        )
    )
    c = clusters_of(push)[f"outbound|9080||{RATINGS}"]
    (t,) = c.circuit_breakers.thresholds
    assert (t.max_connections.value, t.max_pending_requests.value) == (1, 1)
    assert (t.max_requests.value, t.max_retries.value) == (MAX, MAX)
    assert http_options(c).common_http_protocol_options.max_requests_per_connection.value == 1
    od = c.outlier_detection
    assert (od.consecutive_5xx.value, od.interval.seconds, od.base_ejection_time.seconds) == (
        1,
        1,
        180,
    )
    assert od.max_ejection_percent.value == 100


def test_port_level_load_balancer_without_hash_turns_hashing_off() -> None:
    # The route's hash policy follows the cluster's merged policy, so a port-level
    # loadBalancer without consistentHash means no hashing on that port.
    push = push_of(
        dr("""  host: reviews
  trafficPolicy:
    loadBalancer: {consistentHash: {httpHeaderName: x-a}}
    portLevelSettings:
    - port: {number: 9080}
      loadBalancer: {simple: ROUND_ROBIN}""")
    )
    assert clusters_of(push)[f"outbound|9080||{REVIEWS}"].lb_policy == C.ROUND_ROBIN
    assert hash_policies(push, sidecar(), push.services[REVIEWS], "", 9080) == []


def test_subset_labels_follow_the_rule_for_the_proxy() -> None:
    from meshpilot.translators.endpoints import subset_labels

    push = push_of(sample("destination-rule-all.yaml"))
    svc = push.services[REVIEWS]
    assert subset_labels(push, sidecar(), svc, "v2") == {"version": "v2"}
    assert subset_labels(push, sidecar(), svc, "v9") is None
