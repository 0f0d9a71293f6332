"""Endpoints of Kubernetes Services from EndpointSlices, Pods and Nodes in the store,
converted from API-server-shaped objects by the Kubernetes source's converter."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from meshpilot.api.mesh import MeshConfig
from meshpilot.config import Config, ConfigKey
from meshpilot.discovery.kube.convert import to_config
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.model.service import Endpoint

MESH = MeshConfig()
HOST = "reviews.bookinfo.svc.cluster.local"


def cfg(kind: str, obj: dict[str, Any]) -> Config:
    result = to_config(kind, obj, "Kubernetes")
    assert isinstance(result, Config), str(result)
    return result


def service(name: str = "reviews", **spec: Any) -> Config:
    body = {
        "selector": {"app": name},
        "ports": [
            {"name": "http", "port": 9080, "targetPort": "web"},
            {"name": "grpc", "port": 9090, "targetPort": 7070},
        ],
        **spec,
    }
    return cfg(
        "Service",
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "bookinfo"},
            "spec": body,
        },
    )


def endpoint(ip: str, pod: str | None = None, **conditions: bool) -> dict[str, Any]:
    e: dict[str, Any] = {"addresses": [ip], "conditions": conditions, "zone": "slice-zone"}
    if pod is not None:
        e["targetRef"] = {"kind": "Pod", "namespace": "bookinfo", "name": pod}
    return e


def endpoint_slice(
    name: str, endpoints: list[dict[str, Any]], service_name: str = "reviews"
) -> Config:
    return cfg(
        "EndpointSlice",
        {
            "metadata": {
                "name": name,
                "namespace": "bookinfo",
                "labels": {"kubernetes.io/service-name": service_name},
            },
            "addressType": "IPv4",
            "endpoints": endpoints,
            # Kubernetes resolved targetPort "web" to 8000 and 7070 stays 7070.
            "ports": [{"name": "http", "port": 8000}, {"name": "grpc", "port": 7070}],
        },
    )


def pod(
    name: str,
    ip: str,
    node: str = "node-1",
    sa: str = "bookinfo-reviews",
    **labels: str,
) -> Config:
    return cfg(
        "Pod",
        {
            "metadata": {"name": name, "namespace": "bookinfo", "labels": labels},
            "spec": {"serviceAccountName": sa, "nodeName": node},
            "status": {
                "podIPs": [{"ip": ip}],
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        },
    )


def node(name: str, region: str, zone: str, subzone: str = "") -> Config:
    labels = {"topology.kubernetes.io/region": region, "topology.kubernetes.io/zone": zone}
    if subzone:
        labels["topology.istio.io/subzone"] = subzone
    return cfg("Node", {"metadata": {"name": name, "labels": labels}})


def build(*configs: Config) -> PushContext:
    store = ConfigStore()
    for c in configs:
        store.apply(c)
    return PushContext.build(store.snapshot(), MESH)


def addresses(ctx: PushContext, port: int = 9080, host: str = HOST) -> list[tuple[str, int]]:
    return [(e.address, e.port) for e in ctx.service_endpoints(host, port)]


def test_slice_endpoints_take_pod_labels_identity_tls_mode_and_node_locality() -> None:
    ctx = build(
        service(),
        pod(
            "r1", "10.1.0.1", version="v1", app="reviews", **{"security.istio.io/tlsMode": "istio"}
        ),
        node("node-1", "us-east", "us-east-1a", "rack-3"),
        endpoint_slice("reviews-abc", [endpoint("10.1.0.1", "r1", ready=True)]),
    )
    (ep,) = ctx.service_endpoints(HOST, 9080)
    assert ep == Endpoint(
        address="10.1.0.1",
        port=8000,
        service_port_name="http",
        labels={"app": "reviews", "version": "v1", "security.istio.io/tlsMode": "istio"},
        locality="us-east/us-east-1a/rack-3",
        service_account="bookinfo-reviews",
        tls_mode="istio",
        workload_name="r1",
        namespace="bookinfo",
    )
    assert addresses(ctx, 9090) == [("10.1.0.1", 7070)]
    svc = ctx.services[HOST]
    assert ctx.service_identities(svc) == (
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
    )


def test_locality_falls_back_to_the_slice_zone_and_istio_locality_label_wins() -> None:
    ctx = build(
        service(),
        pod("r1", "10.1.0.1", node="unknown", app="reviews"),
        pod("r2", "10.1.0.2", app="reviews", **{"istio-locality": "eu.eu-1b.r9"}),
        node("node-1", "us-east", "us-east-1a"),
        endpoint_slice("reviews-abc", [endpoint("10.1.0.1", "r1"), endpoint("10.1.0.2", "r2")]),
    )
    assert [e.locality for e in ctx.service_endpoints(HOST, 9080)] == [
        "/slice-zone",
        "eu/eu-1b/r9",
    ]


def test_not_ready_and_terminating_endpoints_are_left_out() -> None:
    ctx = build(
        service(),
        *(pod(f"r{i}", f"10.1.0.{i}", app="reviews") for i in range(1, 5)),
        endpoint_slice(
            "reviews-abc",
            [
                endpoint("10.1.0.1", "r1"),  # ready unset: ready
                endpoint("10.1.0.2", "r2", ready=False),
                endpoint("10.1.0.3", "r3", ready=False, serving=True, terminating=True),
                endpoint("10.1.0.4", "r4", ready=True),
            ],
        ),
    )
    assert addresses(ctx) == [("10.1.0.1", 8000), ("10.1.0.4", 8000)]


def test_endpoint_waits_for_its_pod_and_ports_match_by_name() -> None:
    unnamed_port_slice = cfg(
        "EndpointSlice",
        {
            "metadata": {
                "name": "reviews-x",
                "namespace": "bookinfo",
                "labels": {"kubernetes.io/service-name": "reviews"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.1.0.9"]}],
            "ports": [{"name": "other", "port": 1234}, {"name": "http", "port": 8001}],
        },
    )
    ctx = build(
        service(),
        endpoint_slice("reviews-abc", [endpoint("10.1.0.1", "missing-pod")]),
        unnamed_port_slice,
    )
    # No Pod named by targetRef: left out; no targetRef: no labels or identity.
    (ep,) = ctx.service_endpoints(HOST, 9080)
    assert (ep.address, ep.port, ep.labels, ep.service_account) == ("10.1.0.9", 8001, {}, "")
    assert addresses(ctx, 9090) == []


def test_slices_of_other_services_fqdn_slices_and_duplicates() -> None:
    fqdn = cfg(
        "EndpointSlice",
        {
            "metadata": {
                "name": "reviews-fqdn",
                "namespace": "bookinfo",
                "labels": {"kubernetes.io/service-name": "reviews"},
            },
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["example.com"]}],
            "ports": [{"name": "http", "port": 80}],
        },
    )
    ctx = build(
        service(),
        service("ratings"),
        pod("r1", "10.1.0.1", app="reviews"),
        endpoint_slice("reviews-a", [endpoint("10.1.0.1", "r1")]),
        # During a handover the same address sits in two slices: one endpoint.
        endpoint_slice("reviews-b", [endpoint("10.1.0.1", "r1")]),
        endpoint_slice("ratings-a", [endpoint("10.2.0.1")], service_name="ratings"),
        fqdn,
    )
    assert addresses(ctx) == [("10.1.0.1", 8000)]
    assert addresses(ctx, host="ratings.bookinfo.svc.cluster.local") == [("10.2.0.1", 8000)]


def test_headless_and_external_name_services_keep_their_semantics() -> None:
    ctx = build(
        service(clusterIP="None"),
        service("ext", type="ExternalName", externalName="db.example.com"),
        endpoint_slice("reviews-a", [endpoint("10.1.0.1")]),
        endpoint_slice("ext-a", [endpoint("10.9.0.1")], service_name="ext"),
    )
    assert addresses(ctx) == [("10.1.0.1", 8000)]
    assert addresses(ctx, host="ext.bookinfo.svc.cluster.local") == [("db.example.com", 9080)]


def test_workload_entries_and_slices_mix() -> None:
    from meshpilot.api.parse import parse_text

    (we,) = parse_text(
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {name: vm, namespace: bookinfo}\n"
        "spec: {address: 10.5.0.1, labels: {app: reviews}, ports: {web: 9000}}\n",
        "we.yaml",
    ).configs
    ctx = build(
        service(),
        pod("r1", "10.1.0.1", app="reviews"),
        endpoint_slice("reviews-a", [endpoint("10.1.0.1", "r1")]),
        we,
    )
    assert addresses(ctx) == [("10.1.0.1", 8000), ("10.5.0.1", 9000)]


def _proxy(pod_name: str, ip: str, **labels: str) -> Proxy:
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": "bookinfo", "LABELS": labels, "SERVICE_ACCOUNT": "bootstrap"})
    node_id = f"sidecar~{ip}~{pod_name}.bookinfo~bookinfo.svc.cluster.local"
    return Proxy.from_node(base_pb2.Node(id=node_id, metadata=meta))


def test_the_pod_is_authoritative_for_a_proxy_labels_identity_and_ips() -> None:
    ctx = build(
        service(),
        pod("r1", "10.1.0.1", sa="reviews-sa", app="reviews", version="v2"),
        endpoint_slice("reviews-a", [endpoint("10.1.0.1", "r1")]),
    )
    connected = _proxy("r1", "127.0.0.5", app="wrong")
    seen = ctx.proxy_view(connected)
    assert seen.labels == {"app": "reviews", "version": "v2"}
    assert seen.service_account == "reviews-sa"
    assert seen.ip_addresses == ("10.1.0.1",)
    # Queries that take a proxy see it as its Pod says.
    assert [i.service.hostname for i in ctx.service_instances(connected)] == [HOST, HOST]
    # No Pod of that name: the bootstrap metadata stands.
    other = _proxy("nopod", "127.0.0.6", app="x")
    assert ctx.proxy_view(other) is other


def test_push_request_kinds() -> None:
    def keys(*kinds: str) -> frozenset[ConfigKey]:
        return frozenset(ConfigKey(k, "bookinfo", "x") for k in kinds)

    assert not PushRequest.for_changes(keys("EndpointSlice", "Pod", "Node", "Namespace")).full
    assert PushRequest.for_changes(keys("EndpointSlice", "Service")).full


def test_node_pod_and_namespace_changes_recompute_only_what_they_feed() -> None:
    store = ConfigStore()
    for c in (
        service(),
        service("ratings"),
        pod("r1", "10.1.0.1", app="reviews"),
        node("node-1", "us-east", "us-east-1a"),
        endpoint_slice("reviews-a", [endpoint("10.1.0.1", "r1")]),
    ):
        store.apply(c)
    ctx = PushContext.build(store.snapshot(), MESH)

    # The Node's zone moves: the endpoints of the pods on it move with it (EDS only).
    changed = store.apply(node("node-1", "us-east", "us-east-1b"))
    assert not PushRequest.for_changes(changed).full
    ctx = ctx.with_endpoint_changes(store.snapshot(), changed)
    assert ctx.changed_hosts == {HOST}
    assert [e.locality for e in ctx.service_endpoints(HOST, 9080)] == ["us-east/us-east-1b"]
    assert not ctx.requires_full_push

    # A Namespace change: nothing in the model reads it, nothing is pushed.
    ns = cfg("Namespace", {"metadata": {"name": "bookinfo", "labels": {"team": "a"}}})
    changed = store.apply(ns)
    assert not PushRequest.for_changes(changed).full
    ctx = ctx.with_endpoint_changes(store.snapshot(), changed)
    assert ctx.changed_hosts == frozenset()
    assert not ctx.requires_full_push

    # The Pod's labels change: its endpoints carry them, and a proxy of that Pod sees
    # other labels, so the push is full.
    changed = store.apply(pod("r1", "10.1.0.1", app="reviews", version="v3"))
    ctx = ctx.with_endpoint_changes(store.snapshot(), changed)
    assert ctx.changed_hosts == {HOST}
    assert ctx.service_endpoints(HOST, 9080)[0].labels["version"] == "v3"
    assert ctx.requires_full_push

    # A Pod that only turns not ready (its slice says so separately): nothing a proxy
    # or an endpoint reads changed.
    not_ready = cfg(
        "Pod",
        {
            "metadata": {
                "name": "r1",
                "namespace": "bookinfo",
                "labels": {"app": "reviews", "version": "v3"},
            },
            "spec": {"serviceAccountName": "bookinfo-reviews", "nodeName": "node-1"},
            "status": {"podIPs": [{"ip": "10.1.0.1"}], "phase": "Running"},
        },
    )
    changed = store.apply(not_ready)
    ctx = ctx.with_endpoint_changes(store.snapshot(), changed)
    assert ctx.changed_hosts == frozenset()
    assert not ctx.requires_full_push
