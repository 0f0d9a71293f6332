"""LDS: captured and explicit sidecar listeners."""

from __future__ import annotations

from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_pb2

from meshpilot.api.mesh import MeshConfig
from meshpilot.translators.listeners import build_listeners

from ._helpers import (
    MONGO,
    PROXY_IP,
    REVIEWS,
    TCP_ECHO,
    TCP_OTHER,
    by_name,
    hcm_of,
    push_of,
    router,
    serialized,
    sidecar,
    tcp_proxy_of,
)

REGISTRY_ONLY = MeshConfig.model_validate({"outboundTrafficPolicy": {"mode": "REGISTRY_ONLY"}})

EXPLICIT = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: explicit, namespace: default}
spec:
  workloadSelector: {labels: {app: reviews}}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    bind: 127.0.0.3
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:8080
  - port: {number: 9000, protocol: TCP, name: tcp}
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:9000
  egress:
  - port: {number: 9080, protocol: HTTP, name: http}
    bind: 127.0.0.2
    captureMode: NONE
    hosts: ["./*"]
  - port: {number: 9000, protocol: TCP, name: tcp}
    bind: 127.0.0.2
    captureMode: NONE
    hosts: ["./*"]
"""


def _listeners(
    *docs: str, mesh: MeshConfig | None = None, **proxy: str
) -> dict[str, listener_pb2.Listener]:
    return by_name(build_listeners(push_of(*docs, mesh=mesh), sidecar(**proxy)))


def _prefixes(chain) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        f"{r.address_prefix}/{r.prefix_len.value}" for r in chain.filter_chain_match.prefix_ranges
    ]


def test_capture_mode_listener_set() -> None:
    ls = _listeners()
    assert list(ls) == sorted(ls)
    assert set(ls) == {
        "0.0.0.0_443",
        "0.0.0.0_5432",
        "0.0.0.0_7070",
        "0.0.0.0_8081",
        "0.0.0.0_8088",
        "0.0.0.0_9000",
        "0.0.0.0_9080",
        "0.0.0.0_27017",
        "virtualInbound",
        "virtualOutbound",
    }
    for name, lst in ls.items():
        if name.startswith("0.0.0.0_"):
            assert lst.HasField("bind_to_port") and lst.bind_to_port.value is False, name
            assert lst.address.socket_address.address == "0.0.0.0"


def test_virtual_outbound_passthrough() -> None:
    vo = _listeners()["virtualOutbound"]
    assert vo.address.socket_address.port_value == 15001
    assert vo.use_original_dst.value is True
    assert not vo.HasField("bind_to_port")
    guard, catch_all = vo.filter_chains
    assert guard.filter_chain_match.destination_port.value == 15001
    assert tcp_proxy_of(guard).cluster == "BlackHoleCluster"
    assert not catch_all.HasField("filter_chain_match")
    assert tcp_proxy_of(catch_all).cluster == "PassthroughCluster"


def test_registry_only_blackholes_unknown_destinations() -> None:
    ls = _listeners(mesh=REGISTRY_ONLY)
    assert tcp_proxy_of(ls["virtualOutbound"].filter_chains[-1]).cluster == "BlackHoleCluster"
    assert tcp_proxy_of(ls["0.0.0.0_9000"].default_filter_chain).cluster == "BlackHoleCluster"


def test_http_port_uses_rds_named_by_port() -> None:
    lst = _listeners()["0.0.0.0_9080"]
    (chain,) = lst.filter_chains
    hcm = hcm_of(chain)
    assert hcm.rds.route_config_name == "9080"
    src = hcm.rds.config_source
    assert src.WhichOneof("config_source_specifier") == "ads"
    assert src.resource_api_version == config_source_pb2.V3
    assert hcm.stat_prefix == "outbound_0.0.0.0_9080"
    assert hcm.use_remote_address.value is False
    # Istio's order: fault and cors carry per-route config, the router comes last.
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.cors",
        "envoy.filters.http.router",
    ]
    assert hcm.http_filters[-1].typed_config.type_url.endswith("router.v3.Router")


def test_tcp_port_chains_match_service_addresses() -> None:
    lst = _listeners()["0.0.0.0_9000"]
    chains = {tcp_proxy_of(c).cluster: _prefixes(c) for c in lst.filter_chains}
    assert chains == {
        f"outbound|9000||{TCP_ECHO}": ["10.96.0.20/32"],
        f"outbound|9000||{TCP_OTHER}": ["10.96.0.21/32"],
    }
    assert tcp_proxy_of(lst.default_filter_chain).cluster == "PassthroughCluster"
    cidr = _listeners()["0.0.0.0_5432"].filter_chains[0]
    assert _prefixes(cidr) == ["10.10.0.0/24"]


def test_service_without_address_takes_the_catch_all_chain() -> None:
    (chain,) = _listeners()["0.0.0.0_27017"].filter_chains
    assert not chain.HasField("filter_chain_match")
    assert tcp_proxy_of(chain).cluster == f"outbound|27017||{MONGO}"


def test_tls_services_without_address_match_by_sni() -> None:
    lst = _listeners()["0.0.0.0_443"]
    snis = {
        tcp_proxy_of(c).cluster: list(c.filter_chain_match.server_names) for c in lst.filter_chains
    }
    assert snis == {
        "outbound|443||api.example.com": ["api.example.com"],
        "outbound|443||pay.example.com": ["pay.example.com"],
    }
    assert [f.name for f in lst.listener_filters] == ["envoy.filters.listener.tls_inspector"]


def test_virtual_inbound_chains_per_instance_port() -> None:
    vi = _listeners()["virtualInbound"]
    assert vi.address.socket_address.port_value == 15006
    assert [f.name for f in vi.listener_filters] == ["envoy.filters.listener.original_dst"]
    chains = {c.name: c for c in vi.filter_chains}
    assert set(chains) == {"virtualInbound-blackhole", "0.0.0.0_8080", "virtualInbound"}
    app = chains["0.0.0.0_8080"]
    assert app.filter_chain_match.destination_port.value == 8080
    hcm = hcm_of(app)
    assert hcm.stat_prefix == "inbound_0.0.0.0_8080;"
    rc = hcm.route_config
    assert rc.name == "inbound|8080||"
    (vh,) = rc.virtual_hosts
    assert list(vh.domains) == ["*"]
    assert vh.routes[0].route.cluster == "inbound|8080||"
    assert tcp_proxy_of(chains["virtualInbound"]).cluster == "InboundPassthroughCluster"
    assert tcp_proxy_of(chains["virtualInbound-blackhole"]).cluster == "BlackHoleCluster"


def test_explicit_sidecar_binds_real_listeners_and_no_virtual_ones() -> None:
    ls = _listeners(EXPLICIT)
    assert set(ls) == {"127.0.0.2_9080", "127.0.0.2_9000", "127.0.0.3_9080", f"{PROXY_IP}_9000"}
    for lst in ls.values():
        assert not lst.HasField("bind_to_port")  # Envoy's default: bind
    http = ls["127.0.0.2_9080"]
    assert (http.address.socket_address.address, http.address.socket_address.port_value) == (
        "127.0.0.2",
        9080,
    )
    assert hcm_of(http.filter_chains[0]).rds.route_config_name == "9080"
    (tcp,) = ls["127.0.0.2_9000"].filter_chains
    # Two TCP services on a bound port cannot be told apart: the first by hostname wins.
    assert tcp_proxy_of(tcp).cluster == f"outbound|9000||{TCP_ECHO}"
    inbound_http = ls["127.0.0.3_9080"]
    assert hcm_of(inbound_http.filter_chains[0]).route_config.virtual_hosts[0].routes[
        0
    ].route.cluster == ("inbound|9080||")
    inbound_tcp = ls[f"{PROXY_IP}_9000"]
    assert inbound_tcp.address.socket_address.address == PROXY_IP
    assert tcp_proxy_of(inbound_tcp.filter_chains[0]).cluster == "inbound|9000||"


def test_interception_none_binds_catch_all_egress_to_localhost() -> None:
    ls = _listeners(interception="NONE")
    assert "virtualOutbound" not in ls and "virtualInbound" not in ls
    assert not [n for n in ls if n.startswith("0.0.0.0_")]
    http = ls["127.0.0.1_9080"]
    assert not http.HasField("bind_to_port")
    assert hcm_of(http.filter_chains[0]).rds.route_config_name == "9080"
    (tcp,) = ls["127.0.0.1_9000"].filter_chains
    assert tcp_proxy_of(tcp).cluster == f"outbound|9000||{TCP_ECHO}"
    tls = ls["127.0.0.1_443"]
    assert len(tls.filter_chains) == 3  # two SNI chains and a catch-all


def test_port_specific_egress_wins_its_port_and_shares_nothing() -> None:
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
    ls = _listeners(sc)
    assert hcm_of(ls["127.0.0.2_9080"].filter_chains[0]).rds.route_config_name == "9080"
    assert hcm_of(ls["0.0.0.0_9080"].filter_chains[0]).rds.route_config_name == "0.0.0.0:9080"
    assert "virtualOutbound" in ls


def test_sidecar_ingress_in_capture_mode_is_a_virtual_inbound_chain() -> None:
    sc = """
    apiVersion: networking.istio.io/v1
    kind: Sidecar
    metadata: {name: ingress, namespace: default}
    spec:
      ingress:
      - port: {number: 9443, protocol: TCP, name: tcp}
        defaultEndpoint: 127.0.0.1:8443
    """
    ls = _listeners(sc)
    chains = {c.name: c for c in ls["virtualInbound"].filter_chains}
    # Ingress listeners replace the service-instance chains, as in Istio.
    assert set(chains) == {"virtualInbound-blackhole", "0.0.0.0_9443", "virtualInbound"}
    assert tcp_proxy_of(chains["0.0.0.0_9443"]).cluster == "inbound|9443||"


def test_router_gets_no_listeners_yet() -> None:
    assert build_listeners(push_of(), router()) == []


def test_no_duplicate_service_chains_or_names() -> None:
    for docs in ((), (EXPLICIT,)):
        for lst in build_listeners(push_of(*docs), sidecar()):
            matches = [
                c.filter_chain_match.SerializeToString(deterministic=True)
                for c in lst.filter_chains
            ]
            assert len(matches) == len(set(matches)), lst.name
            names = [c.name for c in lst.filter_chains if c.name]
            assert len(names) == len(set(names)), lst.name


def test_deterministic() -> None:
    for docs in ((), (EXPLICIT,)):
        a = build_listeners(push_of(*docs), sidecar())
        b = build_listeners(push_of(*docs), sidecar())
        assert serialized(a) == serialized(b)


def test_reviews_is_served_on_its_target_port() -> None:
    vi = _listeners()["virtualInbound"]
    chain = next(c for c in vi.filter_chains if c.name == "0.0.0.0_8080")
    route = hcm_of(chain).route_config.virtual_hosts[0].routes[0]
    assert route.decorator.operation == f"{REVIEWS}:8080/*"
