"""ConfigGenerator's per-resource cache: resources keyed by what they depend on.

Sidecars of different workloads share every outbound resource; scopes that see the same
services share them too; a config change rebuilds only what depends on it; assembled
route configurations are byte for byte what the translators build.
"""

from __future__ import annotations

import itertools

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2
from prometheus_client import generate_latest

from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.config import kinds
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.monitoring.metrics import REGISTRY
from meshpilot.translators import clusters, endpoints, listeners, routes
from meshpilot.xds import typeurls
from meshpilot.xds.generator import ConfigGenerator
from meshpilot.xds.resources import Generated, Resource
from meshpilot.xds.server import DiscoveryServer

SERVICES = 4


def _service(i: int, *, dr_timeout: str = "10s", vs_weight: int = 80) -> str:
    name = f"svc{i}"
    docs = [
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n"
        f"spec: {{selector: {{app: {name}}}, ports: [{{name: http, port: 9080}}, "
        f"{{name: tcp-db, port: 5432}}]}}\n",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: {name}, namespace: bench}}\n"
        f"spec:\n  host: {name}\n  trafficPolicy:\n"
        f"    outlierDetection: {{consecutive5xxErrors: 5, interval: {dr_timeout}}}\n"
        "  subsets:\n"
        + "".join(f"  - {{name: v{k}, labels: {{version: v{k}}}}}\n" for k in (1, 2)),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {name}, namespace: bench}}\n"
        f"spec:\n  hosts: [{name}]\n  http:\n"
        "  - match: [{sourceLabels: {role: admin}}]\n"
        f"    route: [{{destination: {{host: {name}, subset: v2}}}}]\n"
        f"  - route:\n    - {{destination: {{host: {name}, subset: v1}}, weight: {vs_weight}}}\n"
        f"    - {{destination: {{host: {name}, subset: v2}}, weight: {100 - vs_weight}}}\n",
    ]
    for j in (1, 2):
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
            f"metadata: {{name: {name}-{j}, namespace: bench}}\n"
            f"spec: {{address: 10.1.{i}.{j}, labels: {{app: {name}, version: v{j}}}}}\n"
        )
    return "---\n".join(docs)


def _workloads(namespace: str, count: int) -> str:
    """A service in `namespace` whose endpoints are the sidecars made by _sidecar."""
    docs = [
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: app, namespace: {namespace}}}\n"
        "spec: {selector: {app: app}, ports: [{name: http, port: 8080}]}\n"
    ]
    for j in range(count):
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
            f"metadata: {{name: app-{j}, namespace: {namespace}}}\n"
            f"spec: {{address: {_workload_ip(namespace, j)}, labels: {{app: app}}}}\n"
        )
    return "---\n".join(docs)


def _workload_ip(namespace: str, j: int) -> str:
    return f"10.9.{sum(namespace.encode()) % 250}.{j + 1}"


def _proxy(namespace: str, ip: str, name: str, **labels: str) -> Proxy:
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": namespace, "LABELS": labels})
    node_id = f"sidecar~{ip}~{name}.{namespace}~{namespace}.svc.cluster.local"
    return Proxy.from_node(base_pb2.Node(id=node_id, metadata=meta))


def _sidecar(namespace: str, j: int) -> Proxy:
    return _proxy(namespace, _workload_ip(namespace, j), f"app-{j}", app="app")


class Mesh:
    def __init__(self, namespaces: list[str], workloads: int = 2) -> None:
        self.store = ConfigStore()
        self.docs = {f"svc{i}": _service(i) for i in range(SERVICES)}
        self.namespaces = list(namespaces)
        self.workloads = workloads
        self.apply()

    def apply(self) -> None:
        docs = [*self.docs.values(), *(_workloads(ns, self.workloads) for ns in self.namespaces)]
        result = parse_text("---\n".join(docs), "mesh.yaml")
        assert not result.errors, result.errors
        self.store.set_origin("mesh.yaml", result.configs)

    def push(self) -> PushContext:
        return PushContext.build(self.store.snapshot(), MeshConfig())


def _gen(gen: ConfigGenerator, type_url: str, proxy: Proxy, push: PushContext) -> Generated:
    out = gen.generate(type_url, proxy, push, None, None)
    assert out is not None
    return out


def _outbound(resources: list[Resource] | tuple[Resource, ...]) -> dict[str, Resource]:
    return {r.name: r for r in resources if r.name.startswith("outbound|")}


def _bytes(resources: object) -> dict[str, bytes]:
    return {r.name: r.body.value for r in resources}  # type: ignore[attr-defined]


def test_output_is_byte_for_byte_what_the_translators_build() -> None:
    mesh = Mesh(["apps"])
    push, gen = mesh.push(), ConfigGenerator()
    for proxy in (
        _sidecar("apps", 0),
        _proxy("apps", "10.7.0.1", "admin", role="admin"),
        _proxy("bench", "10.7.0.2", "client"),
    ):
        for _ in range(2):  # built, then assembled from cached pieces
            cds = _gen(gen, typeurls.CLUSTER, proxy, push)
            lds = _gen(gen, typeurls.LISTENER, proxy, push)
            rds = _gen(gen, typeurls.ROUTE, proxy, push)
            want_cds = [
                Resource.of(c.name, c, typeurls.CLUSTER)
                for c in clusters.build_clusters(push, proxy)
            ]
            want_lds = [
                Resource.of(x.name, x, typeurls.LISTENER)
                for x in listeners.build_listeners(push, proxy)
            ]
            want_rds = [
                Resource.of(x.name, x, typeurls.ROUTE)
                for x in routes.build_route_configs(push, proxy, None)
            ]
            assert [r.name for r in cds.resources] == [r.name for r in want_cds]
            assert _bytes(cds.resources) == _bytes(want_cds)
            assert [r.name for r in lds.resources] == [r.name for r in want_lds]
            assert _bytes(lds.resources) == _bytes(want_lds)
            # Route configurations are assembled from serialized virtual hosts.
            assert [r.name for r in rds.resources] == [r.name for r in want_rds]
            assert _bytes(rds.resources) == _bytes(want_rds)
            assert [r.version for r in rds.resources] == [r.version for r in want_rds]


def test_sidecars_of_different_workloads_share_every_outbound_resource() -> None:
    mesh = Mesh(["apps"])
    push, gen = mesh.push(), ConfigGenerator()
    a, b = _sidecar("apps", 0), _sidecar("apps", 1)
    # Both are sidecars of a workload: each has its own inbound part.
    assert push.service_instances(a) and push.service_instances(b)
    cds_a, cds_b = _gen(gen, typeurls.CLUSTER, a, push), _gen(gen, typeurls.CLUSTER, b, push)
    out_a, out_b = _outbound(list(cds_a.resources)), _outbound(list(cds_b.resources))
    assert out_a and out_a.keys() == out_b.keys()
    assert all(out_a[n] is out_b[n] for n in out_a)
    assert "inbound|8080||" in {r.name for r in cds_a.resources}
    rds_a, rds_b = _gen(gen, typeurls.ROUTE, a, push), _gen(gen, typeurls.ROUTE, b, push)
    assert rds_a.resources is rds_b.resources
    lds_a, lds_b = _gen(gen, typeurls.LISTENER, a, push), _gen(gen, typeurls.LISTENER, b, push)
    shared = {r.name: r for r in lds_a.resources if r.name != "virtualInbound"}
    for r in lds_b.resources:
        if r.name != "virtualInbound":
            assert shared[r.name] is r


def test_proxies_in_many_namespaces_share_clusters_and_the_cache_does_not_grow() -> None:
    namespaces = [f"ns{i}" for i in range(50)]
    mesh = Mesh(namespaces, workloads=1)
    push, gen = mesh.push(), ConfigGenerator()
    first: dict[str, Resource] = {}
    sizes = []
    for ns in namespaces:
        cds = _gen(gen, typeurls.CLUSTER, _sidecar(ns, 0), push)
        _gen(gen, typeurls.ROUTE, _sidecar(ns, 0), push)
        bench = {n: r for n, r in _outbound(list(cds.resources)).items() if "bench" in n}
        assert len(bench) == SERVICES * 2 * 3  # 2 ports x (default + 2 subsets)
        if not first:
            first = bench
        assert all(first[n] is r for n, r in bench.items())
        # Shared entries (the proxy's own inbound part is its own, in table "own").
        sizes.append(gen.table_sizes()["resources"] + gen.table_sizes()["vhosts"])
    # Each namespace adds only what it alone has: every namespace has a service `app`,
    # and the proxy's own namespace's one has the short domain `app`: one virtual host
    # and the route configuration of its port. Everything else is shared.
    per_namespace = {b - a for a, b in itertools.pairwise(sizes[1:])}
    assert per_namespace == {2}


def test_destination_rule_change_rebuilds_only_its_hosts_clusters() -> None:
    mesh = Mesh(["apps"])
    gen, proxy = ConfigGenerator(), _sidecar("apps", 0)
    push = mesh.push()
    before = _outbound(list(_gen(gen, typeurls.CLUSTER, proxy, push).resources))
    misses = gen.resource_cache_stats()["misses"]
    mesh.docs["svc1"] = _service(1, dr_timeout="30s")
    mesh.apply()
    push2 = mesh.push()
    after = _outbound(list(_gen(gen, typeurls.CLUSTER, proxy, push2).resources))
    rebuilt = {n for n in after if after[n] is not before[n]}
    assert rebuilt == {n for n in after if n.endswith("|svc1.bench.svc.cluster.local")}
    assert len(rebuilt) == 6
    assert gen.resource_cache_stats()["misses"] - misses == len(rebuilt)
    assert b"30s" not in before["outbound|9080||svc1.bench.svc.cluster.local"].body.value
    assert (
        after["outbound|9080||svc1.bench.svc.cluster.local"]
        != before["outbound|9080||svc1.bench.svc.cluster.local"]
    )


def test_destination_rule_change_keeps_load_assignments_it_does_not_change() -> None:
    mesh = Mesh(["apps"])
    gen, proxy = ConfigGenerator(), _sidecar("apps", 0)
    push = mesh.push()
    names = frozenset(_outbound(list(_gen(gen, typeurls.CLUSTER, proxy, push).resources)))
    eds = gen.generate(typeurls.ENDPOINT, proxy, push, names, None)
    assert eds is not None
    mesh.docs["svc1"] = _service(1, dr_timeout="30s")
    mesh.apply()
    push2 = mesh.push()
    gen.on_new_context(push, push2)
    eds2 = gen.generate(typeurls.ENDPOINT, proxy, push2, names, None)
    assert eds2 is not None
    before = {r.name: r for r in eds.resources}
    rebuilt = {r.name for r in eds2.resources if before[r.name] is not r}
    # svc1's assignments depend on its rule (subset labels; outlier detection turns on
    # locality failover); every other host's are carried over as they are.
    assert rebuilt == {
        f"outbound|{port}|{subset}|svc1.bench.svc.cluster.local"
        for port in (9080, 5432)
        for subset in ("", "v1", "v2")
    }


def test_virtual_service_change_rebuilds_only_its_hosts_virtual_hosts() -> None:
    mesh = Mesh(["apps"])
    gen, proxy = ConfigGenerator(), _sidecar("apps", 0)
    _gen(gen, typeurls.ROUTE, proxy, mesh.push())
    vhost_misses = gen._rds.vhosts.misses
    mesh.docs["svc2"] = _service(2, vs_weight=50)
    mesh.apply()
    push2 = mesh.push()
    rds = _gen(gen, typeurls.ROUTE, proxy, push2)
    # One virtual host for svc2 on port 9080; every other one comes from the cache.
    assert gen._rds.vhosts.misses - vhost_misses == 1
    want = routes.build_route_configs(push2, proxy, None)
    assert _bytes(rds.resources) == {
        rc.name: rc.SerializeToString(deterministic=True) for rc in want
    }
    assert b"svc2" in _bytes(rds.resources)["9080"]


def test_endpoint_change_rebuilds_only_its_load_assignments() -> None:
    mesh = Mesh(["apps"])
    gen, proxy = ConfigGenerator(), _sidecar("apps", 0)
    push = mesh.push()
    names = frozenset(_outbound(list(_gen(gen, typeurls.CLUSTER, proxy, push).resources)))
    eds = gen.generate(typeurls.ENDPOINT, proxy, push, names, None)
    assert eds is not None
    before = {r.name: r for r in eds.resources}
    mesh.docs["svc3"] = mesh.docs["svc3"].replace("10.1.3.2", "10.1.3.9")
    mesh.apply()
    snapshot2 = mesh.store.snapshot()
    changed = frozenset(k for k in snapshot2.of_kind(kinds.WORKLOAD_ENTRY) if k.name == "svc3-2")
    assert changed
    push2 = push.with_endpoint_changes(snapshot2, changed)
    gen.on_new_context(push, push2)
    eds_misses = gen._eds.misses
    eds2 = gen.generate(typeurls.ENDPOINT, proxy, push2, names, None)
    assert eds2 is not None
    after = {r.name: r for r in eds2.resources}
    rebuilt = {n for n in after if after[n] is not before[n]}
    assert rebuilt and all(n.endswith("|svc3.bench.svc.cluster.local") for n in rebuilt)
    assert gen._eds.misses - eds_misses == len(rebuilt)


def test_cache_stays_bounded_while_namespaces_come_and_go() -> None:
    gen = ConfigGenerator(max_resources=60)
    for round_ in range(6):
        namespaces = [f"r{round_}-ns{i}" for i in range(10)]
        mesh = Mesh(namespaces, workloads=1)
        push = mesh.push()
        for ns in namespaces:
            for type_url in (typeurls.CLUSTER, typeurls.ROUTE):
                _gen(gen, type_url, _sidecar(ns, 0), push)
        # Three caches (resources, virtual hosts, own parts) of at most 60 entries each.
        assert gen.resource_cache_stats()["size"] <= 3 * 60
    stats = gen.resource_cache_stats()
    assert stats["evictions"] > 0
    assert stats["hits"] > stats["misses"]


def test_cache_reads_size_and_evictions_are_in_metrics() -> None:
    mesh = Mesh(["apps"])
    gen = ConfigGenerator(max_resources=30)
    DiscoveryServer(gen)
    for _ in range(2):  # a second push context reads the same resources again
        _gen(gen, typeurls.CLUSTER, _sidecar("apps", 0), mesh.push())
    for i in range(SERVICES):  # new rules: new clusters, and the old ones are evicted
        mesh.docs[f"svc{i}"] = _service(i, dr_timeout="20s")
    mesh.apply()
    _gen(gen, typeurls.CLUSTER, _sidecar("apps", 0), mesh.push())
    text = generate_latest(REGISTRY).decode()
    stats = gen.resource_cache_stats()
    assert stats["hits"] > 0 and stats["misses"] > 0 and stats["evictions"] > 0
    assert f'pilot_xds_cache_reads_total{{type="hit"}} {float(stats["hits"])}' in text
    assert f'pilot_xds_cache_reads_total{{type="miss"}} {float(stats["misses"])}' in text
    assert f"pilot_xds_cache_size {float(stats['size'])}" in text
    assert f'pilot_xds_cache_evictions_total{{reason="size"}} {float(stats["evictions"])}' in text


SPECIAL = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: svc0-here, namespace: special}
spec:
  host: svc0.bench.svc.cluster.local
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
  subsets:
  - {name: v9, labels: {version: v1}}
---
apiVersion: v1
kind: Service
metadata: {name: secret, namespace: private, annotations: {networking.istio.io/exportTo: "."}}
spec: {selector: {app: secret}, ports: [{name: http, port: 9080}]}
"""


def _assert_as_translators_build(gen: ConfigGenerator, push: PushContext, proxy: Proxy) -> None:
    cds = _gen(gen, typeurls.CLUSTER, proxy, push)
    assert _bytes(cds.resources) == {
        c.name: c.SerializeToString(deterministic=True)
        for c in clusters.build_clusters(push, proxy)
    }
    lds = _gen(gen, typeurls.LISTENER, proxy, push)
    assert _bytes(lds.resources) == {
        x.name: x.SerializeToString(deterministic=True)
        for x in listeners.build_listeners(push, proxy)
    }
    rds = _gen(gen, typeurls.ROUTE, proxy, push)
    assert _bytes(rds.resources) == {
        x.name: x.SerializeToString(deterministic=True)
        for x in routes.build_route_configs(push, proxy, None)
    }
    names = frozenset(_outbound(list(cds.resources)))
    eds = gen.generate(typeurls.ENDPOINT, proxy, push, names, None)
    assert eds is not None
    assert _bytes(eds.resources) == {
        n: endpoints.build_load_assignment(push, proxy, n).SerializeToString(deterministic=True)
        for n in names
    }


def test_namespaces_with_their_own_rules_or_services_get_their_own_config() -> None:
    mesh = Mesh(["apps", "other", "special", "private"])
    mesh.docs["special"] = SPECIAL
    mesh.apply()
    push, gen = mesh.push(), ConfigGenerator()
    order = ["apps", "special", "private", "other", "special", "apps"]
    for ns in order:
        _assert_as_translators_build(gen, push, _sidecar(ns, 0))
    special = _gen(gen, typeurls.CLUSTER, _sidecar("special", 0), push)
    assert "outbound|9080|v9|svc0.bench.svc.cluster.local" in _bytes(special.resources)
    apps = _gen(gen, typeurls.CLUSTER, _sidecar("apps", 0), push)
    assert "outbound|9080|v9|svc0.bench.svc.cluster.local" not in _bytes(apps.resources)
    assert "outbound|9080||secret.private.svc.cluster.local" not in _bytes(apps.resources)
    private = _gen(gen, typeurls.CLUSTER, _sidecar("private", 0), push)
    assert "outbound|9080||secret.private.svc.cluster.local" in _bytes(private.resources)
    # Route configurations without services of the proxy's own namespace are shared
    # by namespaces with the same view; those with one (short domains) are not.
    rds_apps = {r.name: r for r in _gen(gen, typeurls.ROUTE, _sidecar("apps", 0), push).resources}
    rds_other = {r.name: r for r in _gen(gen, typeurls.ROUTE, _sidecar("other", 0), push).resources}
    assert rds_apps["9080"] is rds_other["9080"]
    assert rds_apps["8080"] is not rds_other["8080"]
    # Neutral namespaces share their outbound clusters.
    other = _gen(gen, typeurls.CLUSTER, _sidecar("other", 0), push)
    assert _outbound(list(apps.resources)).keys() == _outbound(list(other.resources)).keys()
    assert all(
        _outbound(list(other.resources))[n] is r for n, r in _outbound(list(apps.resources)).items()
    )


def test_a_sidecars_own_part_is_rebuilt_only_when_its_own_inputs_change() -> None:
    mesh = Mesh(["apps"])
    gen, proxy = ConfigGenerator(), _sidecar("apps", 0)

    def own() -> dict[str, Resource]:
        push = mesh.push()
        cds = _gen(gen, typeurls.CLUSTER, proxy, push)
        lds = _gen(gen, typeurls.LISTENER, proxy, push)
        _assert_as_translators_build(gen, push, proxy)
        return {
            r.name: r
            for r in [*cds.resources, *lds.resources]
            if r.name in ("inbound|8080||", "virtualInbound")
        }

    first = own()
    assert len(first) == 2
    mesh.docs["svc1"] = _service(1, dr_timeout="30s")  # elsewhere: kept as it is
    mesh.apply()
    second = own()
    assert all(second[n] is first[n] for n in first)
    # The proxy's own service now speaks HTTP/2: its inbound cluster and chain change.
    mesh.docs["apps"] = _workloads("apps", 2).replace(
        "name: http, port: 8080", "name: grpc, port: 8080"
    )
    mesh.namespaces = []
    mesh.apply()
    third = own()
    assert all(third[n] is not first[n] for n in first)
