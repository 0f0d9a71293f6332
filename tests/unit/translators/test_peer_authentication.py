"""PeerAuthentication: Istio's precedence, and the inbound filter chains each mode gives
(STRICT, PERMISSIVE, DISABLE, portLevelMtls), XFCC, and Sidecar ingress TLS."""

from __future__ import annotations

import pytest
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from meshpilot.model.push_context import PushContext
from meshpilot.model.security import DISABLE, PERMISSIVE, STRICT
from meshpilot.translators.listeners import build_listeners

from ._helpers import by_name, hcm_of, push_of, sidecar, tcp_proxy_of, unpack

ISTIO_ALPNS = ["istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"]
APP = "0.0.0.0_8080"  # reviews' inbound chain: service port 9080, target port 8080
FCM = listener_components_pb2.FilterChainMatch


def pa(
    name: str,
    namespace: str,
    mode: str | None,
    selector: dict[str, str] | None = None,
    ports: dict[int, str] | None = None,
    created: str = "",
) -> str:
    """A PeerAuthentication document."""
    lines = [
        "apiVersion: security.istio.io/v1",
        "kind: PeerAuthentication",
        "metadata:",
        f"  name: {name}",
        f"  namespace: {namespace}",
    ]
    if created:
        lines.append(f"  creationTimestamp: '{created}'")
    lines.append("spec:")
    if selector:
        lines.append(f"  selector: {{matchLabels: {selector}}}".replace("'", ""))
    if mode:
        lines.append(f"  mtls: {{mode: {mode}}}")
    if ports:
        lines.append("  portLevelMtls:")
        for port, port_mode in ports.items():
            lines.append(f"    {port}: {{mode: {port_mode}}}")
    if lines[-1] == "spec:":
        lines[-1] = "spec: {}"
    return "\n".join(lines)


def peer(
    push: PushContext, namespace: str = "default", **labels: str
) -> tuple[str, dict[int, str]]:
    policy = push.security.peer_authentication(namespace, labels or {"app": "reviews"})
    return policy.mode, dict(policy.port_modes)


def virtual_inbound(push: PushContext, **kw: object) -> listener_pb2.Listener:
    return by_name(build_listeners(push, sidecar(sds=True, **kw)))["virtualInbound"]  # type: ignore[arg-type]


def chains(lst: listener_pb2.Listener, name: str) -> list[listener_components_pb2.FilterChain]:
    return [c for c in lst.filter_chains if c.name == name]


def shape(chain: listener_components_pb2.FilterChain) -> tuple[str, list[str], bool]:
    """(transport protocol, ALPNs matched, terminates TLS)."""
    m = chain.filter_chain_match
    return m.transport_protocol, list(m.application_protocols), chain.HasField("transport_socket")


def downstream(chain: listener_components_pb2.FilterChain) -> tls_pb2.DownstreamTlsContext:
    assert chain.transport_socket.name == "envoy.transport_sockets.tls"
    return unpack(chain.transport_socket.typed_config, tls_pb2.DownstreamTlsContext)


# --- precedence ----------------------------------------------------------------------------------


def test_default_is_permissive() -> None:
    assert peer(push_of()) == (PERMISSIVE, {})


def test_namespace_overrides_mesh_and_workload_overrides_namespace() -> None:
    mesh = pa("mesh", "istio-system", STRICT)
    ns = pa("ns", "default", DISABLE)
    wl = pa("wl", "default", STRICT, {"app": "reviews"})
    assert peer(push_of(mesh)) == (STRICT, {})
    assert peer(push_of(mesh, ns)) == (DISABLE, {})
    assert peer(push_of(mesh, ns, wl)) == (STRICT, {})
    # The workload policy selects by label; others in the namespace get the namespace's.
    assert peer(push_of(mesh, ns, wl), app="ratings") == (DISABLE, {})
    # Other namespaces: the mesh policy.
    assert peer(push_of(mesh, ns, wl), "other") == (STRICT, {})


def test_unset_inherits_from_the_wider_scope() -> None:
    mesh = pa("mesh", "istio-system", STRICT)
    ns = pa("ns", "default", "UNSET")
    wl = pa("wl", "default", None, {"app": "reviews"}, {8080: DISABLE, 9090: "UNSET"})
    assert peer(push_of(mesh, ns)) == (STRICT, {})
    assert peer(push_of(mesh, ns, wl)) == (STRICT, {8080: DISABLE, 9090: STRICT})


def test_port_level_mtls_only_on_workload_policies() -> None:
    ns = pa("ns", "default", STRICT, ports={8080: DISABLE})
    assert peer(push_of(ns)) == (STRICT, {})


def test_selector_policies_in_the_root_namespace_are_ignored() -> None:
    root = pa("root", "istio-system", STRICT, {"app": "reviews"})
    assert peer(push_of(root)) == (PERMISSIVE, {})
    assert peer(push_of(root), "istio-system") == (PERMISSIVE, {})


def test_oldest_policy_wins_within_a_scope() -> None:
    older = pa("zz-older", "default", STRICT, created="2024-01-01T00:00:00Z")
    newer = pa("aa-newer", "default", DISABLE, created="2025-01-01T00:00:00Z")
    assert peer(push_of(older, newer)) == (STRICT, {})
    w_old = pa("w2", "default", DISABLE, {"app": "reviews"}, created="2024-01-01T00:00:00Z")
    w_new = pa("w1", "default", STRICT, {"app": "reviews"}, created="2025-01-01T00:00:00Z")
    assert peer(push_of(w_old, w_new)) == (DISABLE, {})


# --- inbound chains ------------------------------------------------------------------------------


def test_permissive_http_port_takes_mtls_with_istio_alpn_and_plaintext() -> None:
    vi = virtual_inbound(push_of())
    mtls, plain = chains(vi, APP)
    assert shape(mtls) == ("tls", ISTIO_ALPNS, True)
    assert shape(plain) == ("raw_buffer", [], False)
    for c in (mtls, plain):
        assert c.filter_chain_match.destination_port.value == 8080
    names = [f.name for f in vi.listener_filters]
    assert names == ["envoy.filters.listener.original_dst", "envoy.filters.listener.tls_inspector"]
    assert vi.continue_on_listener_filters_timeout


def test_inbound_mtls_context_is_istios() -> None:
    ctx = downstream(chains(virtual_inbound(push_of()), APP)[0])
    assert ctx.require_client_certificate.value
    common = ctx.common_tls_context
    assert list(common.alpn_protocols) == ["h2", "http/1.1"]
    (cert,) = common.tls_certificate_sds_secret_configs
    assert cert.name == "default"
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == "ROOTCA"
    # Any mesh identity may connect; AuthorizationPolicy decides who may call.
    assert not combined.default_validation_context.match_typed_subject_alt_names
    sds = cert.sds_config.api_config_source.grpc_services[0].envoy_grpc.cluster_name
    assert sds == "sds-grpc"
    params = common.tls_params
    assert params.tls_minimum_protocol_version == params.TLSv1_2
    assert "ECDHE-ECDSA-AES256-GCM-SHA384" in params.cipher_suites


def test_permissive_tcp_port_passes_other_tls_through() -> None:
    push = push_of(
        """
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: echo, namespace: default}
        spec: {address: 10.0.0.1, labels: {app: tcp-echo}}
        """
    )
    vi = virtual_inbound(push)
    mtls, passthrough, plain = chains(vi, "0.0.0.0_9000")
    assert shape(mtls) == ("tls", ISTIO_ALPNS, True)
    assert list(downstream(mtls).common_tls_context.alpn_protocols) == [
        "istio-peer-exchange",
        "h2",
        "http/1.1",
    ]
    assert shape(passthrough) == ("tls", [], False)
    assert shape(plain) == ("raw_buffer", [], False)
    assert {tcp_proxy_of(c).cluster for c in (mtls, passthrough, plain)} == {"inbound|9000||"}


def test_strict_port_has_only_the_mtls_chain() -> None:
    vi = virtual_inbound(push_of(pa("ns", "default", STRICT)))
    (mtls,) = chains(vi, APP)
    assert shape(mtls) == ("tls", [], True)
    # Unknown ports are STRICT too: the catch-all only takes mTLS.
    (catch_all,) = chains(vi, "virtualInbound")
    assert shape(catch_all) == ("tls", [], True)
    assert tcp_proxy_of(catch_all).cluster == "InboundPassthroughCluster"
    tls_inspector = vi.listener_filters[1]
    assert not tls_inspector.HasField("filter_disabled") or tls_inspector.filter_disabled.HasField(
        "destination_port_range"
    )


def test_disable_is_plaintext_only_and_skips_the_tls_inspector() -> None:
    vi = virtual_inbound(push_of(pa("ns", "default", DISABLE)))
    (plain,) = chains(vi, APP)
    assert shape(plain) == ("", [], False)
    (catch_all,) = chains(vi, "virtualInbound")
    assert shape(catch_all) == ("", [], False)
    assert [f.name for f in vi.listener_filters] == ["envoy.filters.listener.original_dst"]


def test_port_level_override_and_inspector_turned_off_where_not_needed() -> None:
    push = push_of(
        pa("wl", "default", STRICT, {"app": "reviews"}, {8080: DISABLE, 7000: PERMISSIVE})
    )
    vi = virtual_inbound(push)
    (plain,) = chains(vi, APP)
    assert shape(plain) == ("", [], False)
    # 7000 is declared by no service: passthrough chains of its own, PERMISSIVE.
    extra = [c for c in chains(vi, "virtualInbound") if c.filter_chain_match.destination_port.value]
    assert [shape(c) for c in extra] == [
        ("tls", ISTIO_ALPNS, True),
        ("tls", [], False),
        ("raw_buffer", [], False),
    ]
    assert {c.filter_chain_match.destination_port.value for c in extra} == {7000}
    # The catch-all is STRICT (needs the inspector), so it is off only on plaintext ports.
    inspector = vi.listener_filters[1]
    ranges = inspector.filter_disabled.or_match.rules
    assert sorted(
        (r.destination_port_range.start, r.destination_port_range.end) for r in ranges
    ) == [
        (8080, 8081),
        (15006, 15007),
    ]


def test_inspector_only_on_tls_ports_when_the_catch_all_is_plaintext() -> None:
    push = push_of(pa("wl", "default", DISABLE, {"app": "reviews"}, {8080: STRICT}))
    inspector = virtual_inbound(push).listener_filters[1]
    only = inspector.filter_disabled.not_match.destination_port_range
    assert (only.start, only.end) == (8080, 8081)


def test_xfcc_from_the_peer_certificate_on_mtls_chains_only() -> None:
    mtls, plain = chains(virtual_inbound(push_of()), APP)
    hcm = hcm_of(mtls)
    assert hcm.forward_client_cert_details == hcm_pb2.HttpConnectionManager.APPEND_FORWARD
    details = hcm.set_current_client_cert_details
    assert details.subject.value and details.uri and details.dns
    # Plaintext callers cannot hand the app a forged identity: Envoy's SANITIZE.
    plain_hcm = hcm_of(plain)
    assert plain_hcm.forward_client_cert_details == hcm_pb2.HttpConnectionManager.SANITIZE
    assert not plain_hcm.HasField("set_current_client_cert_details")


def test_proxy_without_the_agent_gets_plaintext_or_refuses_strict() -> None:
    permissive = by_name(build_listeners(push_of(), sidecar()))["virtualInbound"]
    assert [shape(c) for c in chains(permissive, APP)] == [("", [], False)]
    strict = by_name(build_listeners(push_of(pa("ns", "default", STRICT)), sidecar()))
    (refused,) = chains(strict["virtualInbound"], APP)
    assert tcp_proxy_of(refused).cluster == "BlackHoleCluster"
    (catch_all,) = chains(strict["virtualInbound"], "virtualInbound")
    assert tcp_proxy_of(catch_all).cluster == "BlackHoleCluster"


# --- bound (Sidecar ingress) listeners -----------------------------------------------------------

INGRESS = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: ingress, namespace: default}
spec:
  workloadSelector: {labels: {app: reviews}}
  ingress:
  - port: {number: 9080, protocol: HTTP, name: http}
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:8080
  - port: {number: 9443, protocol: HTTPS, name: https}
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:8443
    tls:
      mode: MUTUAL
      serverCertificate: /etc/certs/server.pem
      privateKey: /etc/certs/server-key.pem
      caCertificates: /etc/certs/ca.pem
      subjectAltNames: [spiffe://cluster.local/ns/default/sa/client]
  - port: {number: 9444, protocol: HTTP, name: http-simple}
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:8444
    tls:
      mode: SIMPLE
      serverCertificate: /etc/certs/server.pem
      privateKey: /etc/certs/server-key.pem
"""


def test_bound_ingress_listener_follows_peer_authentication() -> None:
    ls = by_name(build_listeners(push_of(INGRESS, pa("ns", "default", STRICT)), sidecar(sds=True)))
    lst = ls["10.0.0.1_9080"]
    (mtls,) = lst.filter_chains
    assert shape(mtls) == ("tls", [], True)
    assert not mtls.filter_chain_match.HasField("destination_port")
    assert [f.name for f in lst.listener_filters] == ["envoy.filters.listener.tls_inspector"]
    permissive = by_name(build_listeners(push_of(INGRESS), sidecar(sds=True)))["10.0.0.1_9080"]
    assert [shape(c) for c in permissive.filter_chains] == [
        ("tls", ISTIO_ALPNS, True),
        ("raw_buffer", [], False),
    ]


@pytest.mark.parametrize("sds", [True, False])
def test_sidecar_ingress_tls_terminates_with_files_overriding_peer_authentication(
    sds: bool,
) -> None:
    ls = by_name(build_listeners(push_of(INGRESS, pa("ns", "default", DISABLE)), sidecar(sds=sds)))
    (chain,) = ls["10.0.0.1_9443"].filter_chains
    assert shape(chain) == ("tls", [], True)
    ctx = downstream(chain)
    assert ctx.require_client_certificate.value
    common = ctx.common_tls_context
    (cert,) = common.tls_certificates
    assert cert.certificate_chain.filename == "/etc/certs/server.pem"
    assert cert.private_key.filename == "/etc/certs/server-key.pem"
    assert common.validation_context.trusted_ca.filename == "/etc/certs/ca.pem"
    (san,) = common.validation_context.match_typed_subject_alt_names
    assert san.matcher.exact == "spiffe://cluster.local/ns/default/sa/client"
    assert not common.tls_certificate_sds_secret_configs  # files, no SDS
    simple = downstream(ls["10.0.0.1_9444"].filter_chains[0])
    assert not simple.HasField("require_client_certificate")
    assert not simple.common_tls_context.HasField("validation_context")
    assert list(simple.common_tls_context.alpn_protocols) == ["h2", "http/1.1"]
    # A verified client certificate goes to the app in XFCC; a SIMPLE caller's does not.
    assert hcm_of(ls["10.0.0.1_9444"].filter_chains[0]).forward_client_cert_details == 0


def test_sidecar_ingress_tls_it_cannot_do_falls_back_to_peer_authentication() -> None:
    sc = INGRESS.replace("mode: SIMPLE", "mode: ISTIO_MUTUAL")
    ls = by_name(build_listeners(push_of(sc), sidecar(sds=True)))
    assert [shape(c) for c in ls["10.0.0.1_9444"].filter_chains] == [
        ("tls", ISTIO_ALPNS, True),
        ("raw_buffer", [], False),
    ]
