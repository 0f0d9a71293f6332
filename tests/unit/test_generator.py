"""ConfigGenerator: proxies share output exactly when their config is the same."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import struct_pb2

from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.xds import typeurls
from meshpilot.xds.generator import ConfigGenerator

MESH = """
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{sourceLabels: {app: productpage}}]
    route: [{destination: {host: reviews, subset: v2}}]
  - route: [{destination: {host: reviews, subset: v1}}]
"""


def _proxy(name: str, ip: str, **labels: str) -> Proxy:
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": "default", "LABELS": labels})
    return Proxy.from_node(
        base_pb2.Node(id=f"sidecar~{ip}~{name}.default~default.svc.cluster.local", metadata=meta)
    )


def _push() -> PushContext:
    store = ConfigStore()
    result = parse_text(MESH, "mesh.yaml")
    assert not result.errors
    store.set_origin("mesh.yaml", result.configs)
    return PushContext.build(store.snapshot(), MeshConfig())


def _subset_of_route(gen: ConfigGenerator, push: PushContext, proxy: Proxy) -> str:
    out = gen.generate(typeurls.ROUTE, proxy, push, frozenset({"9080"}), None)
    assert out is not None
    rc = route_pb2.RouteConfiguration.FromString(out.resources[0].body.value)
    vhost = next(v for v in rc.virtual_hosts if "reviews" in v.domains)
    return vhost.routes[0].route.cluster


def test_source_labels_split_route_sharing_and_same_labels_share() -> None:
    push, gen = _push(), ConfigGenerator()
    productpage = _proxy("productpage-1", "10.0.0.1", app="productpage")
    productpage2 = _proxy("productpage-2", "10.0.0.2", app="productpage")
    other = _proxy("ratings-1", "10.0.0.3", app="ratings")
    assert _subset_of_route(gen, push, productpage).startswith("outbound|9080|v2|")
    assert _subset_of_route(gen, push, other).startswith("outbound|9080|v1|")
    a = gen.generate(typeurls.ROUTE, productpage, push, frozenset({"9080"}), None)
    b = gen.generate(typeurls.ROUTE, productpage2, push, frozenset({"9080"}), None)
    assert a is not None and b is not None
    # Same scope and same relevant labels: the very same serialized resource.
    assert a.resources[0] is b.resources[0]


def test_clusters_are_shared_across_proxies_of_one_scope() -> None:
    push, gen = _push(), ConfigGenerator()
    a = gen.generate(typeurls.CLUSTER, _proxy("a", "10.0.0.1", app="x"), push, None, None)
    b = gen.generate(typeurls.CLUSTER, _proxy("b", "10.0.0.2", app="y"), push, None, None)
    assert a is not None and b is not None
    assert a.resources is b.resources
    names = {r.name for r in a.resources}
    assert {
        "outbound|9080||reviews.default.svc.cluster.local",
        "outbound|9080|v1|reviews.default.svc.cluster.local",
        "outbound|9080|v2|reviews.default.svc.cluster.local",
    } <= names
