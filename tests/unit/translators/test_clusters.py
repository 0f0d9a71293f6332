"""CDS: outbound, inbound and fixed clusters."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from meshpilot.api.mesh import MeshConfig
from meshpilot.translators.clusters import build_clusters

from ._helpers import (
    GREETER,
    MONGO,
    PROXY_IP,
    RATINGS,
    REVIEWS,
    by_name,
    push_of,
    router,
    serialized,
    sidecar,
    unpack,
)

C = cluster_pb2.Cluster
H2_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
MAX = 2**32 - 1


def _socket(c: cluster_pb2.Cluster) -> list[tuple[str, int]]:
    return [
        (e.endpoint.address.socket_address.address, e.endpoint.address.socket_address.port_value)
        for loc in c.load_assignment.endpoints
        for e in loc.lb_endpoints
    ]


def test_names_sorted_with_fixed_clusters() -> None:
    clusters = build_clusters(push_of(), sidecar())
    names = [c.name for c in clusters]
    assert names == sorted(names)
    assert {"BlackHoleCluster", "PassthroughCluster", "InboundPassthroughCluster"} <= set(names)
    assert f"outbound|9080||{REVIEWS}" in names
    assert "outbound|9080||details.other.svc.cluster.local" in names
    # UDP ports get no cluster, as in Istio.
    assert f"outbound|5353||{GREETER}" not in names


def test_eds_cluster_for_client_side_lb_service() -> None:
    c = by_name(build_clusters(push_of(), sidecar()))[f"outbound|9080||{RATINGS}"]
    assert c.type == C.EDS
    assert c.eds_cluster_config.service_name == c.name
    src = c.eds_cluster_config.eds_config
    assert src.WhichOneof("config_source_specifier") == "ads"
    assert src.resource_api_version == config_source_pb2.V3
    assert c.alt_stat_name == c.name + ";"
    assert c.connect_timeout.seconds == 10
    assert c.lb_policy == C.LEAST_REQUEST
    assert c.HasField("common_lb_config")
    (t,) = c.circuit_breakers.thresholds
    assert (t.max_connections.value, t.max_pending_requests.value) == (MAX, MAX)
    assert (t.max_requests.value, t.max_retries.value) == (MAX, MAX)
    assert t.track_remaining
    assert H2_KEY not in c.typed_extension_protocol_options
    md = c.metadata.filter_metadata["istio"]
    assert md["services"][0]["host"] == RATINGS


def test_connect_timeout_from_mesh_config() -> None:
    push = push_of(mesh=MeshConfig(connect_timeout="2.5s"))
    c = by_name(build_clusters(push, sidecar()))[f"outbound|9080||{RATINGS}"]
    assert (c.connect_timeout.seconds, c.connect_timeout.nanos) == (2, 500_000_000)


def test_grpc_port_gets_http2_upstream() -> None:
    c = by_name(build_clusters(push_of(), sidecar()))[f"outbound|7070||{GREETER}"]
    opts = unpack(
        c.typed_extension_protocol_options[H2_KEY], http_protocol_options_pb2.HttpProtocolOptions
    )
    assert opts.explicit_http_config.HasField("http2_protocol_options")


def test_dns_service_entry_is_strict_dns_with_inline_endpoints() -> None:
    c = by_name(build_clusters(push_of(), sidecar()))["outbound|443||api.example.com"]
    assert c.type == C.STRICT_DNS
    assert not c.HasField("eds_cluster_config")
    assert c.load_assignment.cluster_name == c.name
    assert _socket(c) == [("api.example.com", 443)]
    assert c.dns_lookup_family == C.V4_ONLY
    assert c.metadata.filter_metadata["istio"]["external"] is True


def test_external_name_service_is_strict_dns() -> None:
    c = by_name(build_clusters(push_of(), sidecar()))[
        "outbound|8088||search.default.svc.cluster.local"
    ]
    assert c.type == C.STRICT_DNS
    assert c.load_assignment.cluster_name == c.name


def test_dns_round_robin_is_logical_dns_with_one_endpoint() -> None:
    c = by_name(build_clusters(push_of(), sidecar()))["outbound|8081||legacy.example.com"]
    assert c.type == C.LOGICAL_DNS
    assert _socket(c) == [("a.legacy.example.com", 8081)]


def test_headless_service_is_original_dst() -> None:
    c = by_name(build_clusters(push_of(), sidecar()))[f"outbound|27017||{MONGO}"]
    assert c.type == C.ORIGINAL_DST
    assert c.lb_policy == C.CLUSTER_PROVIDED
    assert not c.HasField("load_assignment")


def test_fixed_clusters() -> None:
    clusters = by_name(build_clusters(push_of(), sidecar()))
    bh = clusters["BlackHoleCluster"]
    assert bh.type == C.STATIC and not bh.HasField("load_assignment")
    for name in ("PassthroughCluster", "InboundPassthroughCluster"):
        c = clusters[name]
        assert c.type == C.ORIGINAL_DST and c.lb_policy == C.CLUSTER_PROVIDED
    ipt = clusters["InboundPassthroughCluster"].upstream_bind_config.source_address
    assert ipt.address == "127.0.0.6"


def test_inbound_cluster_per_service_instance_uses_target_port() -> None:
    clusters = by_name(build_clusters(push_of(), sidecar()))
    inbound = [n for n in clusters if n.startswith("inbound|")]
    # reviews: service port 9080, the workload listens on targetPort 8080 (Istio >= 1.10).
    assert inbound == ["inbound|8080||"]
    c = clusters["inbound|8080||"]
    assert c.type == C.STATIC
    assert _socket(c) == [("127.0.0.1", 8080)]
    assert not c.HasField("upstream_bind_config")
    assert c.alt_stat_name == "inbound|8080||;"


SIDECAR_INGRESS = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: reviews, namespace: default}
spec:
  workloadSelector: {labels: {app: reviews}}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:8080
    captureMode: NONE
  - port: {number: 9081, protocol: GRPC, name: grpc}
    defaultEndpoint: 0.0.0.0:8081
  - port: {number: 9082, protocol: HTTP, name: uds}
    defaultEndpoint: unix:///var/run/app.sock
  - port: {number: 9083, protocol: TCP, name: orig}
  egress:
  - hosts: ["./*"]
"""


def test_inbound_clusters_from_sidecar_ingress_default_endpoints() -> None:
    clusters = by_name(build_clusters(push_of(SIDECAR_INGRESS), sidecar()))
    inbound = sorted(n for n in clusters if n.startswith("inbound|"))
    # Ingress listeners replace service instances; each gets a cluster, matched or not.
    assert inbound == ["inbound|9080||", "inbound|9081||", "inbound|9082||", "inbound|9083||"]
    local = clusters["inbound|9080||"]
    assert local.type == C.STATIC and _socket(local) == [("127.0.0.1", 8080)]
    pod_ip = clusters["inbound|9081||"]
    assert _socket(pod_ip) == [(PROXY_IP, 8081)]
    assert pod_ip.upstream_bind_config.source_address.address == "127.0.0.6"
    assert H2_KEY in pod_ip.typed_extension_protocol_options
    (uds,) = [
        e for loc in clusters["inbound|9082||"].load_assignment.endpoints for e in loc.lb_endpoints
    ]
    assert uds.endpoint.address.pipe.path == "/var/run/app.sock"
    orig = clusters["inbound|9083||"]
    assert orig.type == C.ORIGINAL_DST and orig.lb_policy == C.CLUSTER_PROVIDED


def test_sidecar_egress_hosts_limit_outbound_clusters() -> None:
    names = {c.name for c in build_clusters(push_of(SIDECAR_INGRESS), sidecar())}
    assert f"outbound|9080||{REVIEWS}" in names
    assert "outbound|9080||details.other.svc.cluster.local" not in names


def test_no_inbound_clusters_without_capture_or_ingress() -> None:
    names = {c.name for c in build_clusters(push_of(), sidecar(interception="NONE"))}
    assert not [n for n in names if n.startswith("inbound|")]


def test_router_gets_outbound_but_no_inbound_clusters() -> None:
    names = {c.name for c in build_clusters(push_of(), router())}
    assert f"outbound|9080||{REVIEWS}" in names
    assert "outbound|9080||details.other.svc.cluster.local" in names
    assert not [n for n in names if n.startswith("inbound|")]
    assert "InboundPassthroughCluster" not in names
    assert {"BlackHoleCluster", "PassthroughCluster"} <= names


def test_deterministic() -> None:
    a = build_clusters(push_of(SIDECAR_INGRESS), sidecar())
    b = build_clusters(push_of(SIDECAR_INGRESS), sidecar())
    assert serialized(a) == serialized(b)
