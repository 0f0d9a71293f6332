"""RDS: sidecar outbound route configurations."""

from __future__ import annotations

from envoy.config.route.v3 import route_pb2

from meshpilot.api.mesh import MeshConfig
from meshpilot.translators.routes import build_route_configs, route_names_for

from ._helpers import DETAILS, RATINGS, REVIEWS, push_of, serialized, sidecar

REGISTRY_ONLY = MeshConfig.model_validate({"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}})


def _route(
    route: str, *docs: str, mesh: MeshConfig | None = None, **proxy: object
) -> route_pb2.RouteConfiguration:
    (rc,) = build_route_configs(push_of(*docs, mesh=mesh), sidecar(**proxy), [route])  # type: ignore[arg-type]
    return rc


def _vhosts(rc: route_pb2.RouteConfiguration) -> dict[str, list[str]]:
    return {vh.name: list(vh.domains) for vh in rc.virtual_hosts}


def test_route_names_are_ports_of_http_listeners() -> None:
    assert route_names_for(push_of(), sidecar()) == ["7070", "8081", "8088", "9080"]


def test_virtual_hosts_per_service_with_istio_domains() -> None:
    rc = _route("9080")
    assert rc.name == "9080"
    assert rc.validate_clusters.value is False
    vhosts = _vhosts(rc)
    assert list(vhosts) == [f"{DETAILS}:9080", f"{RATINGS}:9080", f"{REVIEWS}:9080", "allow_any"]
    assert vhosts[f"{REVIEWS}:9080"] == [
        REVIEWS,
        f"{REVIEWS}:9080",
        "reviews",
        "reviews:9080",
        "reviews.default",
        "reviews.default:9080",
        "reviews.default.svc",
        "reviews.default.svc:9080",
        "10.96.0.10",
        "10.96.0.10:9080",
    ]
    # Another namespace: no bare short name (it would resolve elsewhere), but name.ns works.
    assert vhosts[f"{DETAILS}:9080"] == [
        DETAILS,
        f"{DETAILS}:9080",
        "details.other",
        "details.other:9080",
        "details.other.svc",
        "details.other.svc:9080",
        "10.96.0.12",
        "10.96.0.12:9080",
    ]
    assert vhosts["allow_any"] == ["*"]


def test_short_name_follows_the_proxy_namespace() -> None:
    rc = _route("9080", namespace="other", labels={"app": "x"}, name="x")
    vhosts = _vhosts(rc)
    assert "details" in vhosts[f"{DETAILS}:9080"]
    assert "reviews" not in vhosts[f"{REVIEWS}:9080"]
    assert "reviews.default" in vhosts[f"{REVIEWS}:9080"]


def test_service_route_and_passthrough() -> None:
    rc = _route("9080")
    vh = {v.name: v for v in rc.virtual_hosts}
    (route,) = vh[f"{REVIEWS}:9080"].routes
    assert route.match.prefix == "/"
    assert route.route.cluster == f"outbound|9080||{REVIEWS}"
    assert route.route.timeout.seconds == 0 and route.route.timeout.nanos == 0
    assert route.route.HasField("timeout")
    assert route.route.retry_policy.num_retries.value == 2
    (allow,) = vh["allow_any"].routes
    assert allow.route.cluster == "PassthroughCluster"


def test_registry_only_blocks_unknown_hosts_with_502() -> None:
    rc = _route("9080", mesh=REGISTRY_ONLY)
    block = rc.virtual_hosts[-1]
    assert block.name == "block_all"
    assert list(block.domains) == ["*"]
    assert block.routes[0].direct_response.status == 502
    assert "allow_any" not in _vhosts(rc)


def test_sidecar_outbound_traffic_policy_overrides_mesh() -> None:
    sc = """
    apiVersion: networking.istio.io/v1
    kind: Sidecar
    metadata: {name: default, namespace: default}
    spec:
      outboundTrafficPolicy: {mode: REGISTRY_ONLY}
    """
    assert _route("9080", sc).virtual_hosts[-1].name == "block_all"


def test_domains_are_unique_first_hostname_wins() -> None:
    # A ServiceEntry claiming the reviews VIP and the same short forms on port 9080.
    se = """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: clash, namespace: default}
    spec:
      hosts: [a-clash.example.com]
      addresses: [10.96.0.10]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: 9080, name: http, protocol: HTTP}]
      endpoints: [{address: 10.1.1.1}]
    """
    rc = _route("9080", se)
    all_domains = [d for vh in rc.virtual_hosts for d in vh.domains]
    assert len(all_domains) == len(set(all_domains))
    vhosts = _vhosts(rc)
    assert "10.96.0.10" in vhosts["a-clash.example.com:9080"]
    assert "10.96.0.10" not in vhosts[f"{REVIEWS}:9080"]


def test_no_duplicate_domains_anywhere() -> None:
    push = push_of()
    for proxy in (sidecar(), sidecar(interception="NONE")):
        for rc in build_route_configs(push, proxy, None):
            domains = [d for vh in rc.virtual_hosts for d in vh.domains]
            assert len(domains) == len(set(domains)), rc.name
            names = [vh.name for vh in rc.virtual_hosts]
            assert len(names) == len(set(names)), rc.name


def test_unknown_names_get_valid_empty_configs_in_request_order() -> None:
    rcs = build_route_configs(push_of(), sidecar(), ["nope", "9080", "nope", "1234"])
    assert [rc.name for rc in rcs] == ["nope", "9080", "1234"]
    assert len(rcs[0].virtual_hosts) == 0
    assert rcs[0].validate_clusters.value is False


def test_none_means_all_names_the_listeners_use() -> None:
    push, proxy = push_of(), sidecar()
    assert [rc.name for rc in build_route_configs(push, proxy, None)] == route_names_for(
        push, proxy
    )


def test_bound_listener_answers_an_unknown_host_404_with_a_body() -> None:
    # An explicit listener has no original destination: passthrough would loop back.
    rc = _route("9080", interception="NONE")
    last = rc.virtual_hosts[-1]
    assert (last.name, list(last.domains)) == ("no_route", ["*"])
    (route,) = last.routes
    assert route.direct_response.status == 404
    assert route.direct_response.body.inline_string == (
        "meshpilot: no VirtualService or service matches this Host on port 9080\n"
    )
    assert "allow_any" not in _vhosts(rc) and "block_all" not in _vhosts(rc)


def test_bound_listener_keeps_block_all_under_registry_only() -> None:
    rc = _route("9080", mesh=REGISTRY_ONLY, interception="NONE")
    assert rc.virtual_hosts[-1].name == "block_all"
    assert rc.virtual_hosts[-1].routes[0].direct_response.status == 502


def test_second_listener_on_a_port_gets_its_own_route() -> None:
    sc = """
    apiVersion: networking.istio.io/v1
    kind: Sidecar
    metadata: {name: mixed, namespace: default}
    spec:
      egress:
      - port: {number: 9080, protocol: HTTP, name: http}
        bind: 127.0.0.2
        hosts: ["./ratings.default.svc.cluster.local"]
      - hosts: ["*/*"]
    """
    push, proxy = push_of(sc), sidecar()
    assert "0.0.0.0:9080" in route_names_for(push, proxy)
    explicit, captured = build_route_configs(push, proxy, ["9080", "0.0.0.0:9080"])
    assert list(_vhosts(explicit)) == [f"{RATINGS}:9080", "no_route"]
    assert f"{REVIEWS}:9080" in _vhosts(captured)
    assert captured.virtual_hosts[-1].name == "allow_any"


def test_deterministic() -> None:
    a = build_route_configs(push_of(), sidecar(), None)
    b = build_route_configs(push_of(), sidecar(), None)
    assert serialized(a) == serialized(b)
