"""Every resource family passes the real Envoy's `--mode validate`.

Envoy NACKs what it cannot accept, usually with an error nobody sees; here the
same checks run at test time, through the binary the mesh deploys.
"""

from __future__ import annotations

import ipaddress

import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from meshpilot.api.mesh import MeshConfig
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.translators import naming
from meshpilot.translators.clusters import build_clusters
from meshpilot.translators.endpoints import build_load_assignment
from meshpilot.translators.listeners import build_listeners
from meshpilot.translators.routes import build_route_configs, route_names_for

from ._helpers import (
    envoy_binary,
    envoy_validate,
    inline_routes,
    push_of,
    router,
    sidecar,
    static_cluster_for,
)
from .test_clusters import SIDECAR_INGRESS
from .test_listeners import EXPLICIT

REGISTRY_ONLY = MeshConfig.model_validate({"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}})

MIXED = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: mixed, namespace: default}
spec:
  workloadSelector: {labels: {app: reviews}}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    defaultEndpoint: 0.0.0.0:8080
  - port: {number: 9090, protocol: GRPC, name: grpc}
    captureMode: NONE
    defaultEndpoint: unix:///var/run/app.sock
  egress:
  - port: {number: 9080, protocol: HTTP, name: http}
    bind: 127.0.0.2
    hosts: ["./ratings.default.svc.cluster.local"]
  - port: {number: 9999, protocol: HTTP, name: uds}
    bind: unix:///var/run/egress.sock
    hosts: ["./*"]
  - hosts: ["*/*"]
"""

CASES = {
    "capture": ((), None, {}),
    "registry-only": ((), REGISTRY_ONLY, {}),
    "tproxy": ((), None, {"interception": "TPROXY"}),
    "interception-none": ((), None, {"interception": "NONE"}),
    "explicit": ((EXPLICIT,), None, {}),
    "ingress-endpoints": ((SIDECAR_INGRESS,), None, {}),
    "mixed": ((MIXED,), None, {}),
}


def _case(name: str) -> tuple[PushContext, Proxy]:
    docs, mesh, proxy = CASES[name]
    return push_of(*docs, mesh=mesh), sidecar(**proxy)


def test_envoy_binary_is_installed() -> None:
    assert envoy_binary().exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_envoy_accepts_clusters(case: str) -> None:
    push, proxy = _case(case)
    envoy_validate(clusters=build_clusters(push, proxy), node_id=proxy.id)


def test_envoy_accepts_gateway_clusters() -> None:
    proxy = router()
    envoy_validate(clusters=build_clusters(push_of(), proxy), node_id=proxy.id)


def test_envoy_accepts_endpoints() -> None:
    push, proxy = _case("capture")
    names = [c.name for c in build_clusters(push, proxy) if c.name.startswith("outbound|")]
    clas = [build_load_assignment(push, proxy, n) for n in names]
    clas.append(build_load_assignment(push, proxy, "outbound|1||unknown.example.com"))
    assert any(len(cla.endpoints) > 1 for cla in clas)  # localities are exercised
    hostname_clas = [c for c in clas if _has_hostnames(c)]
    ip_clas = [c for c in clas if not _has_hostnames(c)]
    clusters = [static_cluster_for(c) for c in ip_clas]
    for cla in hostname_clas:
        c = static_cluster_for(cla)
        c.type = c.STRICT_DNS  # STATIC clusters take IPs only
        clusters.append(c)
    envoy_validate(clusters=clusters, node_id=proxy.id)


def _has_hostnames(cla: endpoint_pb2.ClusterLoadAssignment) -> bool:
    for loc in cla.endpoints:
        for e in loc.lb_endpoints:
            try:
                ipaddress.ip_address(e.endpoint.address.socket_address.address)
            except ValueError:
                return True
    return False


@pytest.mark.parametrize("case", sorted(CASES))
def test_envoy_accepts_listeners_with_their_routes(case: str) -> None:
    push, proxy = _case(case)
    routes = {rc.name: rc for rc in build_route_configs(push, proxy, None)}
    listeners = inline_routes(build_listeners(push, proxy), routes)
    assert listeners
    envoy_validate(clusters=build_clusters(push, proxy), listeners=listeners, node_id=proxy.id)


def test_envoy_accepts_every_route_config() -> None:
    """All route configs, plus an unknown name, each behind its own listener."""
    listeners = []
    port = 20000
    for case in sorted(CASES):
        push, proxy = _case(case)
        for rc in build_route_configs(push, proxy, [*route_names_for(push, proxy), "unknown"]):
            hcm = hcm_pb2.HttpConnectionManager(stat_prefix=f"r{port}", route_config=rc)
            hcm.http_filters.add(name="envoy.filters.http.router").typed_config.Pack(
                router_pb2.Router()
            )
            lst = listener_pb2.Listener(name=f"route-{port}")
            lst.address.socket_address.address = "127.0.0.1"
            lst.address.socket_address.port_value = port
            chain = listener_components_pb2.FilterChain()
            f = chain.filters.add(name="envoy.filters.network.http_connection_manager")
            f.typed_config.Pack(hcm)
            lst.filter_chains.append(chain)
            listeners.append(lst)
            port += 1
    envoy_validate(listeners=listeners)


def test_fixed_names_appear_in_validated_config() -> None:
    push, proxy = _case("capture")
    names = {c.name for c in build_clusters(push, proxy)}
    assert naming.PASSTHROUGH_CLUSTER in names
    assert naming.VIRTUAL_OUTBOUND in {lst.name for lst in build_listeners(push, proxy)}
