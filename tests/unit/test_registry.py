"""Service registry: services and endpoints from Service, ServiceEntry and WorkloadEntry."""

from __future__ import annotations

import textwrap

import pytest

from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.config import ConfigKey
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.push_context import PushContext
from meshpilot.model.service import Protocol, Resolution

REVIEWS = "reviews.bookinfo.svc.cluster.local"
RATINGS = "ratings.bookinfo.svc.cluster.local"


def y(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def svc(name: str, app: str, ports: str, extra: str = "") -> str:
    return y(
        f"""
        apiVersion: v1
        kind: Service
        metadata: {{name: {name}, namespace: bookinfo}}
        spec:
          selector: {{app: {app}}}
          ports: {ports}
        """
    ) + (textwrap.indent(y(extra), "  ") if extra else "")


def we(name: str, address: str, labels: str, ports: str = "{}", ns: str = "bookinfo") -> str:
    return y(
        f"""
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {{name: {name}, namespace: {ns}}}
        spec: {{address: "{address}", labels: {labels}, ports: {ports}}}
        """
    )


def store_of(*docs: str, origin: str = "mesh.yaml") -> ConfigStore:
    store = ConfigStore()
    result = parse_text("---\n".join(docs), origin)
    assert result.errors == [], [str(e) for e in result.errors]
    store.set_origin(origin, result.configs)
    return store


def build(store: ConfigStore) -> PushContext:
    return PushContext.build(store.snapshot(), MeshConfig())


def eps(ctx: PushContext, host: str, port: int) -> list[tuple[str, int]]:
    return sorted((e.address, e.port) for e in ctx.service_endpoints(host, port))


BASE = [
    svc(
        "reviews",
        "reviews",
        "[{name: http, port: 9080, targetPort: 8080}, "
        "{name: grpc, port: 9090, targetPort: grpc-port}]",
    ),
    svc("ratings", "ratings", "[{name: http-web, port: 9080}]"),
    we("r1", "10.0.0.1", "{app: reviews, version: v1}", "{grpc-port: 7070}"),
    we("r2", "10.0.0.2", "{app: reviews, version: v2}", "{http: 9999}"),
    we("other-ns", "10.0.0.3", "{app: reviews}", ns="elsewhere"),
    we("rt1", "10.0.1.1", "{app: ratings}"),
]


def test_kube_service_selects_workload_entries_and_maps_ports() -> None:
    ctx = build(store_of(*BASE))
    reviews = ctx.services[REVIEWS]
    assert reviews.resolution is Resolution.CLIENT_SIDE_LB
    assert [(p.name, p.port, p.protocol) for p in reviews.ports] == [
        ("http", 9080, Protocol.HTTP),
        ("grpc", 9090, Protocol.GRPC),
    ]
    # r1: numeric targetPort; r2: its own port named like the service port.
    assert eps(ctx, REVIEWS, 9080) == [("10.0.0.1", 8080), ("10.0.0.2", 9999)]
    # r1 names the targetPort; r2 does not, so it falls back to the service port.
    assert eps(ctx, REVIEWS, 9090) == [("10.0.0.1", 7070), ("10.0.0.2", 9090)]
    # No targetPort: the service port itself; other namespaces never match.
    assert eps(ctx, RATINGS, 9080) == [("10.0.1.1", 9080)]
    ep = ctx.service_endpoints(REVIEWS, 9080)[0]
    assert ep.labels["version"] == "v1"
    assert ep.service_port_name == "http"
    assert ep.workload_name == "r1" and ep.namespace == "bookinfo"
    assert ep.service_account == "default"


def test_workload_entry_metadata_labels_also_select() -> None:
    doc = y(
        """
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata:
          name: meta
          namespace: bookinfo
          labels:
            app: ratings
            topology.kubernetes.io/region: eu
            security.istio.io/tlsMode: istio
        spec: {address: 10.0.1.9, serviceAccount: ratings-sa}
        """
    )
    ctx = build(store_of(*BASE, doc))
    by_addr = {e.address: e for e in ctx.service_endpoints(RATINGS, 9080)}
    assert by_addr["10.0.1.9"].locality == "eu"
    assert by_addr["10.0.1.9"].tls_mode == "istio"
    assert by_addr["10.0.1.9"].service_account == "ratings-sa"


def test_headless_and_external_name_services() -> None:
    headless = svc("db", "db", "[{name: tcp, port: 5432}]", "clusterIP: None\n")
    external = y(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: ext, namespace: bookinfo}
        spec: {type: ExternalName, externalName: example.com, ports: [{port: 443}]}
        """
    )
    ctx = build(store_of(headless, external))
    assert ctx.services["db.bookinfo.svc.cluster.local"].resolution is Resolution.PASSTHROUGH
    assert ctx.services["ext.bookinfo.svc.cluster.local"].resolution is Resolution.DNS_LB


def se(name: str, body: str) -> str:
    return y(
        f"""
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: {name}, namespace: bookinfo}}
        spec:
        """
    ) + textwrap.indent(y(body), "  ")


def test_service_entry_static_endpoints() -> None:
    doc = se(
        "static",
        """
        hosts: [static.example.com]
        location: MESH_INTERNAL
        resolution: STATIC
        ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}, {number: 443}]
        endpoints:
        - {address: 192.0.2.1}
        - {address: 192.0.2.2, ports: {http: 9000}, weight: 3}
        - {address: not-an-ip.example.com}
        """,
    )
    ctx = build(store_of(doc))
    s = ctx.services["static.example.com"]
    assert s.resolution is Resolution.CLIENT_SIDE_LB and not s.mesh_external
    assert [(p.name, p.protocol) for p in s.ports] == [
        ("http", Protocol.HTTP),
        ("443", Protocol.TCP),
    ]
    # STATIC endpoints must be IPs: the hostname one is dropped.
    assert eps(ctx, "static.example.com", 80) == [("192.0.2.1", 8080), ("192.0.2.2", 9000)]
    assert eps(ctx, "static.example.com", 443) == [("192.0.2.1", 443), ("192.0.2.2", 443)]
    weights = {e.address: e.weight for e in ctx.service_endpoints("static.example.com", 80)}
    assert weights == {"192.0.2.1": 1, "192.0.2.2": 3}


def test_service_entry_dns_with_and_without_endpoints() -> None:
    own = se(
        "own",
        """
        hosts: [api.example.com, www.example.com]
        resolution: DNS
        ports: [{number: 443, name: https, protocol: HTTPS}]
        """,
    )
    listed = se(
        "listed",
        """
        hosts: [lb.example.com]
        resolution: DNS
        ports: [{number: 80, name: http}]
        endpoints: [{address: a.lb.example.com}, {address: b.lb.example.com, ports: {http: 8080}}]
        """,
    )
    ctx = build(store_of(own, listed))
    assert ctx.services["api.example.com"].resolution is Resolution.DNS_LB
    assert ctx.services["api.example.com"].mesh_external
    # Each host of a DNS ServiceEntry without endpoints resolves itself.
    assert eps(ctx, "api.example.com", 443) == [("api.example.com", 443)]
    assert eps(ctx, "www.example.com", 443) == [("www.example.com", 443)]
    assert eps(ctx, "lb.example.com", 80) == [("a.lb.example.com", 80), ("b.lb.example.com", 8080)]


def test_service_entry_resolution_none_has_no_endpoints() -> None:
    doc = se(
        "passthrough",
        """
        hosts: ["*.wiki.example.org"]
        resolution: NONE
        ports: [{number: 443, name: tls, protocol: TLS}]
        """,
    )
    ctx = build(store_of(doc))
    assert ctx.services["*.wiki.example.org"].resolution is Resolution.PASSTHROUGH
    assert eps(ctx, "*.wiki.example.org", 443) == []


def test_service_entry_workload_selector() -> None:
    doc = se(
        "vms",
        """
        hosts: [vm.bookinfo.internal]
        location: MESH_INTERNAL
        resolution: STATIC
        ports: [{number: 8080, name: http, targetPort: 80}]
        workloadSelector: {labels: {app: vm}}
        """,
    )
    docs = [
        doc,
        we("vm1", "10.1.0.1", "{app: vm}"),
        we("vm2", "10.1.0.2", "{app: vm}", "{http: 8888}"),
        we("vm3", "10.1.0.3", "{app: other}"),
        we("vm4", "10.1.0.4", "{app: vm}", ns="elsewhere"),
    ]
    ctx = build(store_of(*docs))
    assert eps(ctx, "vm.bookinfo.internal", 8080) == [("10.1.0.1", 80), ("10.1.0.2", 8888)]


def test_kube_service_wins_hostname_clash_with_service_entry() -> None:
    clash = se(
        "clash",
        f"""
        hosts: [{REVIEWS}]
        resolution: DNS
        ports: [{{number: 1234, name: tcp}}]
        """,
    )
    ctx = build(store_of(*BASE, clash))
    assert ctx.services[REVIEWS].source == ConfigKey("Service", "bookinfo", "reviews")


def changed_context(before: list[str], after: list[str]) -> PushContext:
    store = store_of(*before)
    ctx = build(store)
    result = parse_text("---\n".join(after), "mesh.yaml")
    changed = store.set_origin("mesh.yaml", result.configs, result.errors)
    assert all(k.kind == "WorkloadEntry" for k in changed)
    new = ctx.with_endpoint_changes(store.snapshot(), changed)
    assert new.services is ctx.services
    return new


@pytest.mark.parametrize(
    ("after", "hosts"),
    [
        pytest.param(
            [*BASE[:2], we("r1", "10.0.0.10", "{app: reviews}"), *BASE[3:]],
            {REVIEWS},
            id="address-moved",
        ),
        pytest.param([*BASE[:2], *BASE[3:]], {REVIEWS}, id="deleted"),
        pytest.param([*BASE, we("new", "10.0.1.2", "{app: ratings}")], {RATINGS}, id="added"),
        pytest.param(
            [*BASE[:2], we("r1", "10.0.0.1", "{app: ratings}"), *BASE[3:]],
            {REVIEWS, RATINGS},
            id="relabelled-between-services",
        ),
        pytest.param([*BASE, we("lonely", "10.9.9.9", "{app: nobody}")], set(), id="unselected"),
        pytest.param(
            [*BASE[:4], we("other-ns", "10.0.0.33", "{app: reviews}", ns="elsewhere"), BASE[5]],
            set(),
            id="other-namespace",
        ),
    ],
)
def test_with_endpoint_changes_reports_changed_hosts(after: list[str], hosts: set[str]) -> None:
    new = changed_context(BASE, after)
    assert new.changed_hosts == hosts
    full = build(store_of(*after))
    # Incremental and full rebuilds agree on every host.
    for host in full.services:
        for port in (p.port for p in full.services[host].ports):
            assert eps(new, host, port) == eps(full, host, port), host


def test_with_endpoint_changes_unchanged_endpoints_not_reported() -> None:
    # The annotation changes the object, not the endpoints it produces.
    annotated = BASE[5].replace("namespace: bookinfo}", "namespace: bookinfo, annotations: {a: b}}")
    assert annotated != BASE[5]
    new = changed_context(BASE, [*BASE[:5], annotated])
    assert new.changed_hosts == frozenset()


def test_with_endpoint_changes_for_service_entry_selector() -> None:
    doc = se(
        "vms",
        """
        hosts: [vm.bookinfo.internal]
        resolution: STATIC
        ports: [{number: 8080, name: http}]
        workloadSelector: {labels: {app: vm}}
        """,
    )
    new = changed_context([doc], [doc, we("vm1", "10.1.0.1", "{app: vm}")])
    assert new.changed_hosts == {"vm.bookinfo.internal"}
    assert eps(new, "vm.bookinfo.internal", 8080) == [("10.1.0.1", 8080)]


def test_endpoints_of_a_few_services_match_the_full_build() -> None:
    # Endpoint-only changes recompute only the affected services, from the same
    # WorkloadEntry index: spec labels override metadata labels, other namespaces
    # never match.
    from meshpilot.model import registry

    override = y(
        """
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: override, namespace: bookinfo, labels: {app: reviews}}
        spec: {address: 10.0.9.1, labels: {app: ratings}}
        """
    )
    docs = [
        svc("ratings", "ratings", "[{name: http, port: 9080}]"),
        svc("reviews", "reviews", "[{name: http, port: 9080}]"),
        *(svc(f"s{i}", f"s{i}", "[{name: http, port: 80}]") for i in range(12)),
        we("r1", "10.0.9.2", "{app: ratings}"),
        we("r2", "10.0.9.3", "{app: reviews}"),
        we("other-ns", "10.0.9.4", "{app: ratings}", ns="elsewhere"),
        override,
    ]
    snapshot = store_of(*docs).snapshot()
    services = registry.build_services(snapshot, "cluster.local")
    full = registry.build_endpoints(snapshot, services)
    for host in ("ratings.bookinfo.svc.cluster.local", "reviews.bookinfo.svc.cluster.local"):
        few = registry.build_endpoints(snapshot, {host: services[host]})
        assert dict(few[host]) == dict(full[host])
    ratings = full["ratings.bookinfo.svc.cluster.local"][9080]
    assert sorted(e.address for e in ratings) == ["10.0.9.1", "10.0.9.2"]
