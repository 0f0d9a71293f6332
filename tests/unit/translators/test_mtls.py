"""Outbound mesh mTLS: auto mTLS, DestinationRule ISTIO_MUTUAL and DISABLE, and the SDS
references a `meshpilot agent` serves."""

from __future__ import annotations

import json

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from google.protobuf import json_format

from meshpilot.agent import bootstrap as agent_bootstrap
from meshpilot.agent import sds as agent_sds
from meshpilot.api.mesh import MeshConfig
from meshpilot.translators import tls as mesh_tls
from meshpilot.translators.clusters import build_clusters
from meshpilot.translators.upstream_tls import DISABLED_MATCH_NAME, ISTIO_MATCH_NAME

from ._helpers import RATINGS as RATINGS_BASE
from ._helpers import REVIEWS, by_name, push_of, sidecar, unpack
from ._samples import DETAILS, PRODUCTPAGE, RATINGS, bookinfo, networking, productpage

C = cluster_pb2.Cluster
SAN = common_pb2.SubjectAltNameMatcher

# Two reviews endpoints with sidecars (different service accounts), one without.
MIXED = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v3, namespace: default}
spec:
  address: 10.0.0.4
  serviceAccount: bookinfo-reviews
  labels: {app: reviews, version: v3, security.istio.io/tlsMode: istio}
"""

# greeter (gRPC) and details (namespace other) with sidecars too.
SIDECARS = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: greeter-1, namespace: default}
spec: {address: 10.0.1.1, labels: {app: greeter, security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: details-1, namespace: other}
spec: {address: 10.0.2.1, labels: {app: details, security.istio.io/tlsMode: istio}}
"""

PASSTHROUGH = """
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: default}
spec:
  selector: {app: headless}
  clusterIP: None
  ports: [{name: http, port: 8000}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: headless-1, namespace: default}
spec: {address: 10.0.3.1, labels: {app: headless, security.istio.io/tlsMode: istio}}
"""


def clusters(*docs: str, mesh: MeshConfig | None = None, sds: bool = True) -> dict[str, C]:
    return by_name(build_clusters(push_of(*docs, mesh=mesh), sidecar(sds=sds)))


def upstream(ts: object) -> tls_pb2.UpstreamTlsContext:
    assert ts.name == "envoy.transport_sockets.tls"  # type: ignore[attr-defined]
    return unpack(ts.typed_config, tls_pb2.UpstreamTlsContext)  # type: ignore[attr-defined]


def sans(ctx: tls_pb2.UpstreamTlsContext) -> list[tuple[int, str]]:
    vc = ctx.common_tls_context.combined_validation_context.default_validation_context
    return [(m.san_type, m.matcher.exact) for m in vc.match_typed_subject_alt_names]


def assert_istio_mutual(ctx: tls_pb2.UpstreamTlsContext, sni: str, *, h2: bool = False) -> None:
    common = ctx.common_tls_context
    assert ctx.sni == sni
    (cert,) = common.tls_certificate_sds_secret_configs
    assert cert.name == "default"
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == "ROOTCA"
    for sds in (cert.sds_config, combined.validation_context_sds_secret_config.sds_config):
        api = sds.api_config_source
        assert api.api_type == api.GRPC
        (svc,) = api.grpc_services
        assert svc.envoy_grpc.cluster_name == "sds-grpc"
        assert sds.initial_fetch_timeout.ToSeconds() == 0
    expected = ["istio-peer-exchange", "istio", *(["h2"] if h2 else [])]
    assert list(common.alpn_protocols) == expected
    assert common.tls_params.tls_minimum_protocol_version == common_pb2.TlsParameters.TLSv1_2
    assert not common.HasField("validation_context")


# --- auto mTLS --------------------------------------------------------------------------------


def test_auto_mtls_uses_transport_socket_matches_per_endpoint_tls_mode() -> None:
    c = clusters(MIXED)[f"outbound|9080||{REVIEWS}"]
    assert not c.HasField("transport_socket")
    istio, plain = c.transport_socket_matches
    assert istio.name == ISTIO_MATCH_NAME == "tlsMode-istio"
    assert json_format.MessageToDict(istio.match) == {"tlsMode": "istio"}
    ctx = upstream(istio.transport_socket)
    assert_istio_mutual(ctx, f"outbound_.9080_._.{REVIEWS}")
    # Every endpoint's identity: bookinfo-reviews (v3) and default (the others).
    assert sans(ctx) == [
        (SAN.URI, "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"),
        (SAN.URI, "spiffe://cluster.local/ns/default/sa/default"),
    ]
    assert plain.name == DISABLED_MATCH_NAME == "tlsMode-disabled"
    assert json_format.MessageToDict(plain.match) == {}
    assert plain.transport_socket.name == "envoy.transport_sockets.raw_buffer"


def test_auto_mtls_sni_names_the_subset_and_h2_clusters_add_h2() -> None:
    named = clusters(
        SIDECARS,
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: default}
        spec:
          host: reviews
          subsets: [{name: v1, labels: {version: v1}}]
        """,
    )
    ctx = upstream(
        named[f"outbound|9080|v1|{REVIEWS}"].transport_socket_matches[0].transport_socket
    )
    assert ctx.sni == f"outbound_.9080_.v1_.{REVIEWS}"
    greeter = named["outbound|7070||greeter.default.svc.cluster.local"]
    ctx = upstream(greeter.transport_socket_matches[0].transport_socket)
    assert_istio_mutual(ctx, "outbound_.7070_._.greeter.default.svc.cluster.local", h2=True)


def test_no_auto_mtls_to_services_without_sidecar_endpoints() -> None:
    # ratings-v1 has no tlsMode label: plaintext, and no SDS reference at all.
    c = clusters()[f"outbound|9080||{RATINGS_BASE}"]
    assert not c.transport_socket_matches and not c.HasField("transport_socket")


def test_proxies_without_the_agent_get_no_mesh_mtls() -> None:
    dr = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: ratings, namespace: default}
    spec: {host: ratings, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}
    """
    named = clusters(dr, sds=False)
    for name in (f"outbound|9080||{REVIEWS}", f"outbound|9080||{RATINGS_BASE}"):
        assert not named[name].transport_socket_matches
        assert not named[name].HasField("transport_socket")


@pytest.mark.parametrize(
    "meta",
    [
        {"SDS": "true"},
        {"PROXY_CONFIG": {"controlPlaneAuthPolicy": "MUTUAL_TLS"}},
        {"LABELS": {"security.istio.io/tlsMode": "istio"}},
    ],
)
def test_what_tells_a_proxy_runs_beside_the_agent(meta: dict[str, object]) -> None:
    from envoy.config.core.v3 import base_pb2
    from google.protobuf import struct_pb2

    from meshpilot.model.proxy import Proxy

    md = struct_pb2.Struct()
    md.update(meta)
    node = base_pb2.Node(id="sidecar~10.0.0.9~a.default~default.svc.cluster.local", metadata=md)
    assert mesh_tls.proxy_has_sds(Proxy.from_node(node))
    assert not mesh_tls.proxy_has_sds(sidecar())


def test_no_auto_mtls_for_mesh_external_services() -> None:
    named = clusters()
    for name in ("outbound|443||api.example.com", "outbound|8081||legacy.example.com"):
        assert not named[name].transport_socket_matches
        assert not named[name].HasField("transport_socket")


def test_auto_mtls_can_be_turned_off_in_mesh_config() -> None:
    named = clusters(mesh=MeshConfig.model_validate({"enableAutoMtls": False}))
    assert not named[f"outbound|9080||{REVIEWS}"].transport_socket_matches


@pytest.mark.parametrize("namespace", ["istio-system", "default"])
def test_no_auto_mtls_when_destination_namespace_or_mesh_disables_mtls(namespace: str) -> None:
    pa = f"""
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {{name: plain, namespace: {namespace}}}
    spec: {{mtls: {{mode: DISABLE}}}}
    """
    named = clusters(SIDECARS, pa)
    assert not named[f"outbound|9080||{REVIEWS}"].transport_socket_matches
    # Another namespace's servers are untouched by a namespace-level policy.
    other = named["outbound|9080||details.other.svc.cluster.local"]
    assert bool(other.transport_socket_matches) == (namespace == "default")


def test_workload_level_disable_does_not_turn_auto_mtls_off() -> None:
    # Istio's inference looks at mesh and namespace policies only.
    pa = """
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: plain, namespace: default}
    spec:
      selector: {matchLabels: {app: reviews}}
      mtls: {mode: DISABLE}
    """
    assert clusters(pa)[f"outbound|9080||{REVIEWS}"].transport_socket_matches


def test_passthrough_service_gets_mtls_only_when_every_endpoint_has_a_sidecar() -> None:
    c = clusters(PASSTHROUGH)["outbound|8000||headless.default.svc.cluster.local"]
    assert c.type == C.ORIGINAL_DST
    # No endpoint metadata on ORIGINAL_DST: a plain transport socket, as Istio.
    assert_istio_mutual(
        upstream(c.transport_socket), "outbound_.8000_._.headless.default.svc.cluster.local"
    )
    plain_too = PASSTHROUGH + (
        "\n---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        "metadata: {name: headless-2, namespace: default}\n"
        "spec: {address: 10.0.3.2, labels: {app: headless}}\n"
    )
    c = clusters(plain_too)["outbound|8000||headless.default.svc.cluster.local"]
    assert not c.HasField("transport_socket") and not c.transport_socket_matches


# --- DestinationRule tls ----------------------------------------------------------------------


def test_destination_rule_istio_mutual_is_a_plain_transport_socket_with_its_own_sni_and_sans() -> (
    None
):
    named = clusters(
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: default}
        spec:
          host: reviews
          trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
          subsets:
          - name: v1
            labels: {version: v1}
          - name: gw
            labels: {version: v2}
            trafficPolicy:
              tls:
                mode: ISTIO_MUTUAL
                sni: reviews.example.com
                subjectAltNames: [spiffe://example.org/ns/x/sa/y]
        """
    )
    v1 = named[f"outbound|9080|v1|{REVIEWS}"]
    assert not v1.transport_socket_matches
    assert_istio_mutual(upstream(v1.transport_socket), f"outbound_.9080_.v1_.{REVIEWS}")
    assert sans(upstream(v1.transport_socket)) == [
        (SAN.URI, "spiffe://cluster.local/ns/default/sa/default")
    ]
    gw = upstream(named[f"outbound|9080|gw|{REVIEWS}"].transport_socket)
    assert gw.sni == "reviews.example.com"
    assert sans(gw) == [(SAN.URI, "spiffe://example.org/ns/x/sa/y")]


def test_destination_rule_disable_turns_auto_mtls_off() -> None:
    named = clusters(
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: default}
        spec:
          host: reviews
          trafficPolicy: {tls: {mode: DISABLE}}
          subsets: [{name: v1, labels: {version: v1}, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}]
        """
    )
    plain = named[f"outbound|9080||{REVIEWS}"]
    assert not plain.HasField("transport_socket") and not plain.transport_socket_matches
    assert named[f"outbound|9080|v1|{REVIEWS}"].HasField("transport_socket")


def test_destination_rule_simple_keeps_file_based_tls_and_no_auto_mtls() -> None:
    c = clusters(
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: reviews, namespace: default}
        spec:
          host: reviews
          trafficPolicy: {tls: {mode: SIMPLE, caCertificates: /etc/ca.pem}}
        """
    )[f"outbound|9080||{REVIEWS}"]
    assert not c.transport_socket_matches
    vc = upstream(c.transport_socket).common_tls_context.validation_context
    assert vc.trusted_ca.filename == "/etc/ca.pem"


def test_istio_sample_destination_rule_all_mtls_unchanged() -> None:
    push = bookinfo(networking("destination-rule-all-mtls.yaml"))
    named = by_name(build_clusters(push, productpage(sds=True)))
    expected = {
        PRODUCTPAGE: ["", "v1"],
        REVIEWS: ["", "v1", "v2", "v3"],
        RATINGS: ["", "v1", "v2", "v2-mysql", "v2-mysql-vm"],
        DETAILS: ["", "v1", "v2"],
    }
    for host, subsets in expected.items():
        for subset in subsets:
            c = named[f"outbound|9080|{subset}|{host}"]
            assert not c.transport_socket_matches, c.name
            ctx = upstream(c.transport_socket)
            assert_istio_mutual(ctx, f"outbound_.9080_.{subset}_.{host}")
            assert sans(ctx) == [(SAN.URI, "spiffe://cluster.local/ns/default/sa/default")]


def test_service_entry_subject_alt_names_are_verified() -> None:
    se = """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: vm, namespace: default}
    spec:
      hosts: [vm.internal]
      location: MESH_INTERNAL
      resolution: STATIC
      subjectAltNames: [spiffe://cluster.local/ns/vm/sa/legacy]
      ports: [{number: 8080, name: http, protocol: HTTP}]
      endpoints: [{address: 10.9.0.1, labels: {security.istio.io/tlsMode: istio}}]
    """
    c = clusters(se)["outbound|8080||vm.internal"]
    ctx = upstream(c.transport_socket_matches[0].transport_socket)
    assert sans(ctx) == [(SAN.URI, "spiffe://cluster.local/ns/vm/sa/legacy")]


def test_trust_domain_comes_from_mesh_config() -> None:
    mesh = MeshConfig.model_validate({"trustDomain": "example.org"})
    c = clusters(mesh=mesh)[f"outbound|9080||{REVIEWS}"]
    ctx = upstream(c.transport_socket_matches[0].transport_socket)
    assert sans(ctx) == [(SAN.URI, "spiffe://example.org/ns/default/sa/default")]


# --- what the agent serves --------------------------------------------------------------------


def test_sds_references_are_what_the_agent_serves() -> None:
    assert mesh_tls.SDS_CLUSTER == agent_bootstrap.SDS_CLUSTER == "sds-grpc"
    assert mesh_tls.WORKLOAD_SECRET == agent_sds.WORKLOAD_SECRET == "default"
    assert mesh_tls.ROOT_SECRET == agent_sds.ROOT_SECRET == "ROOTCA"
    # The same ConfigSource the agent's own bootstrap uses for its xDS certificate.
    ours = json_format.MessageToDict(mesh_tls.sds_config_source())
    theirs = json.loads(json.dumps(agent_bootstrap.sds_config_source()))
    assert _normalize(ours) == _normalize(theirs)


def _normalize(d: dict[str, object]) -> str:
    """camelCase and snake_case keys alike, for comparing a proto dict with JSON."""
    return json.dumps(json_format.MessageToDict(json_format.ParseDict(d, _config_source())))


def _config_source() -> object:
    from envoy.config.core.v3 import config_source_pb2

    return config_source_pb2.ConfigSource()
