"""VirtualService `tcp` and `tls` rules in sidecar outbound listeners."""

from __future__ import annotations

from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

from meshpilot.api.mesh import MeshConfig
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.translators.listeners import build_listeners

from ._helpers import TCP_ECHO, by_name, dedent, push_of, sidecar, tcp_proxy_of
from ._samples import sample, tcp_echo_base

ALL_V1 = sample("tcp-echo/tcp-echo-all-v1.yaml")
TWENTY_V2 = sample("tcp-echo/tcp-echo-20-v2.yaml")


def mesh_version(text: str) -> str:
    """Istio's tcp-echo gateway manifests for sidecars: no Gateway, the VirtualService
    bound to the mesh for host tcp-echo, matching the service port instead of 31400."""
    docs = [d for d in text.split("\n---\n") if "kind: Gateway" not in d]
    out = "\n---\n".join(docs)
    out = out.replace("  gateways:\n  - tcp-echo-gateway\n", "")
    out = out.replace('  hosts:\n  - "*"\n', "  hosts:\n  - tcp-echo\n")
    out = out.replace("port: 31400", "port: 9000")
    assert "31400" not in out and "gateway" not in out.split("kind: VirtualService")[1]
    return out


DR_ONLY = "\n---\n".join(d for d in ALL_V1.split("\n---\n") if "kind: DestinationRule" in d)


def vs_only(text: str) -> str:
    return "\n---\n".join(d for d in text.split("\n---\n") if "kind: VirtualService" in d)


def echo_push(*docs: str, mesh: MeshConfig | None = None) -> PushContext:
    return push_of(*docs, mesh=mesh, base=tcp_echo_base())


def client(**kw: object) -> Proxy:
    args: dict[str, object] = {"ip": "10.1.0.99", "name": "sleep", "labels": {"app": "sleep"}}
    args.update(kw)
    return sidecar(**args)  # type: ignore[arg-type]


def listeners(push: PushContext, proxy: Proxy | None = None) -> dict[str, listener_pb2.Listener]:
    return by_name(build_listeners(push, proxy or client()))


def echo_chain_proxy(lst: listener_pb2.Listener) -> tcp_proxy_pb2.TcpProxy:
    (chain,) = lst.filter_chains
    return tcp_proxy_of(chain)


def cluster(subset: str, port: int = 9000) -> str:
    return f"outbound|{port}|{subset}|{TCP_ECHO}"


def weights(proxy: tcp_proxy_pb2.TcpProxy) -> dict[str, int]:
    return {c.name: c.weight for c in proxy.weighted_clusters.clusters}


def test_without_virtual_service_the_service_cluster() -> None:
    tp = echo_chain_proxy(listeners(echo_push(DR_ONLY))["0.0.0.0_9000"])
    assert tp.cluster == cluster("")


def test_all_v1_sends_every_connection_to_v1() -> None:
    ls = listeners(echo_push(mesh_version(ALL_V1)))
    tp = echo_chain_proxy(ls["0.0.0.0_9000"])
    assert tp.cluster == cluster("v1")
    assert tp.stat_prefix == cluster("v1")
    # The rule matches port 9000 only: 9001 keeps its own cluster.
    assert echo_chain_proxy(ls["0.0.0.0_9001"]).cluster == cluster("", 9001)


def test_twenty_v2_splits_80_20() -> None:
    tp = echo_chain_proxy(listeners(echo_push(DR_ONLY, mesh_version(TWENTY_V2)))["0.0.0.0_9000"])
    assert tp.WhichOneof("cluster_specifier") == "weighted_clusters"
    assert weights(tp) == {cluster("v1"): 80, cluster("v2"): 20}
    assert tp.stat_prefix == "tcp-echo.default"  # Istio: the VirtualService name.namespace


def test_hundred_zero_split_leaves_out_the_zero() -> None:
    hundred = (
        mesh_version(TWENTY_V2)
        .replace("weight: 80", "weight: 100")
        .replace("weight: 20", "weight: 0")
    )
    tp = echo_chain_proxy(listeners(echo_push(DR_ONLY, hundred))["0.0.0.0_9000"])
    assert weights(tp) == {cluster("v1"): 100}


def test_split_in_explicit_mode_on_the_bound_listener() -> None:
    explicit = dedent(
        """
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {name: explicit, namespace: default}
        spec:
          egress:
          - port: {number: 9000, protocol: TCP, name: tcp}
            bind: 127.0.0.2
            captureMode: NONE
            hosts: ["./tcp-echo.default.svc.cluster.local"]
        """
    )
    ls = listeners(echo_push(DR_ONLY, mesh_version(TWENTY_V2), explicit))
    assert "0.0.0.0_9000" not in ls
    tp = echo_chain_proxy(ls["127.0.0.2_9000"])
    assert weights(tp) == {cluster("v1"): 80, cluster("v2"): 20}


def test_split_on_a_vip_chain_in_capture_mode() -> None:
    # The base test mesh's tcp-echo has a VIP: its chain matches 10.96.0.20/32.
    vs = mesh_version(TWENTY_V2)
    push = push_of(DR_ONLY, vs)
    lst = by_name(build_listeners(push, sidecar()))["0.0.0.0_9000"]
    by_prefix = {
        c.filter_chain_match.prefix_ranges[0].address_prefix: tcp_proxy_of(c)
        for c in lst.filter_chains
    }
    assert weights(by_prefix["10.96.0.20"]) == {cluster("v1"): 80, cluster("v2"): 20}
    assert by_prefix["10.96.0.21"].cluster.endswith("tcp-other.default.svc.cluster.local")


def test_source_labels_and_gateways_decide_per_proxy() -> None:
    vs = dedent(
        """
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: tcp-echo, namespace: default}
        spec:
          hosts: [tcp-echo]
          tcp:
          - match: [{gateways: [tcp-echo-gateway]}]
            route: [{destination: {host: tcp-echo, subset: v2}}]
          - match: [{sourceLabels: {app: canary-client}, port: 9000}]
            route: [{destination: {host: tcp-echo, subset: v2}}]
          - match: [{sourceNamespace: other}]
            route: [{destination: {host: tcp-echo, subset: v1}}]
        """
    )
    push = echo_push(DR_ONLY, vs)
    assert echo_chain_proxy(listeners(push)["0.0.0.0_9000"]).cluster == cluster("")
    canary = client(labels={"app": "canary-client"})
    assert echo_chain_proxy(listeners(push, canary)["0.0.0.0_9000"]).cluster == cluster("v2")
    elsewhere = client(namespace="other")
    assert echo_chain_proxy(listeners(push, elsewhere)["0.0.0.0_9000"]).cluster == cluster("v1")


def test_missing_subsets_are_dropped_then_blackholed() -> None:
    # No DestinationRule: subset clusters do not exist on the proxy.
    tp = echo_chain_proxy(listeners(echo_push(mesh_version(TWENTY_V2)))["0.0.0.0_9000"])
    assert tp.cluster == "BlackHoleCluster"
    partial = mesh_version(TWENTY_V2).replace("subset: v2", "subset: v9")
    tp = echo_chain_proxy(listeners(echo_push(DR_ONLY, partial))["0.0.0.0_9000"])
    assert weights(tp) == {cluster("v1"): 80}


# --- tls ---------------------------------------------------------------------------------

TLS_SERVICES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: secure, namespace: default}
spec:
  hosts: [secure.example.com, alt.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vip, namespace: default}
spec:
  hosts: [vip.example.com]
  addresses: [10.20.0.1]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: https, protocol: HTTPS}]
"""

TLS_VS = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: default}
spec:
  hosts: [secure.example.com, vip.example.com]
  tls:
  - match: [{sniHosts: [secure.example.com], port: 443}, {sniHosts: [other.example.com]}]
    route: [{destination: {host: alt.example.com}}]
  - match: [{sniHosts: [secure.example.com]}]
    route: [{destination: {host: vip.example.com}}]
  - match: [{sniHosts: [vip.example.com]}]
    route:
    - destination: {host: vip.example.com}
      weight: 60
    - destination: {host: secure.example.com}
      weight: 40
"""


def _tls_chains(
    push: PushContext,
) -> dict[tuple[tuple[str, ...], tuple[str, ...]], tcp_proxy_pb2.TcpProxy]:
    lst = by_name(build_listeners(push, sidecar()))["0.0.0.0_443"]
    assert "envoy.filters.listener.tls_inspector" in [f.name for f in lst.listener_filters]
    out = {}
    for chain in lst.filter_chains:
        m = chain.filter_chain_match
        key = (
            tuple(m.server_names),
            tuple(f"{r.address_prefix}/{r.prefix_len.value}" for r in m.prefix_ranges),
        )
        assert key not in out, f"duplicate filter chain match {key}"
        out[key] = tcp_proxy_of(chain)
    return out


def test_tls_routes_match_sni_hosts() -> None:
    chains = _tls_chains(push_of(TLS_SERVICES, TLS_VS))
    alt, vip, secure = (f"outbound|443||{h}.example.com" for h in ("alt", "vip", "secure"))
    split = {vip: 60, secure: 40}
    # Each match is a chain on its SNI names; a later rule for the same names is never
    # reached (Istio), so secure.example.com goes to alt, not to vip.
    for cidrs in ((), ("10.20.0.1/32",)):  # the VIP-less service, then the VIP service
        assert chains[(("secure.example.com",), cidrs)].cluster == alt
        assert chains[(("other.example.com",), cidrs)].cluster == alt
        assert weights(chains[(("vip.example.com",), cidrs)]) == split
    # Services the VirtualService does not name keep Istio's default chains.
    assert chains[(("pay.example.com",), ())].cluster == "outbound|443||pay.example.com"
    assert chains[(("alt.example.com",), ())].cluster == alt


def test_tls_without_virtual_service_is_unchanged() -> None:
    chains = _tls_chains(push_of(TLS_SERVICES))
    assert chains[(("secure.example.com",), ())].cluster == "outbound|443||secure.example.com"
    assert chains[((), ("10.20.0.1/32",))].cluster == "outbound|443||vip.example.com"


TCP_POLICY = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo-destination, namespace: default}
spec:
  host: tcp-echo
  trafficPolicy:
    connectionPool: {tcp: {idleTimeout: 30s, maxConnectionDuration: 1h}}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer: {consistentHash: {useSourceIp: true}}
  - name: v2
    labels: {version: v2}
"""


def test_destination_rule_tcp_settings_reach_the_tcp_proxy() -> None:
    # No VirtualService: the service's own cluster, with the rule's pool settings.
    tp = echo_chain_proxy(listeners(echo_push(TCP_POLICY))["0.0.0.0_9000"])
    assert tp.idle_timeout.seconds == 30
    assert tp.max_downstream_connection_duration.seconds == 3600
    assert not tp.hash_policy
    # Routed to v1: that subset's source-IP hashing too (Istio's maybeSetHashPolicy).
    all_v1 = vs_only(mesh_version(ALL_V1))
    tp = echo_chain_proxy(listeners(echo_push(TCP_POLICY, all_v1))["0.0.0.0_9000"])
    assert tp.cluster == cluster("v1")
    assert tp.hash_policy[0].HasField("source_ip")
    assert tp.idle_timeout.seconds == 30
    # A split: the rule without subset settings.
    tp = echo_chain_proxy(listeners(echo_push(TCP_POLICY, mesh_version(TWENTY_V2)))["0.0.0.0_9000"])
    assert weights(tp) == {cluster("v1"): 80, cluster("v2"): 20}
    assert not tp.hash_policy and tp.idle_timeout.seconds == 30
