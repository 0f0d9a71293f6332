"""Security config in the push pipeline: LDS cache keys follow the policies that select
a proxy (and nothing else of its labels), CDS keys follow SDS capability, endpoint
changes that alter verified identities force a full push, and analysis findings."""

from __future__ import annotations

import textwrap

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from meshpilot.analysis import analyze
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
metadata: {name: reviews, namespace: default}
spec: {selector: {app: reviews}, ports: [{name: http, port: 9080}]}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-1, namespace: default}
spec:
  address: 10.0.0.1
  serviceAccount: reviews
  labels: {app: reviews, version: v1, security.istio.io/tlsMode: istio}
"""

SELECTS_V1 = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: v1-only, namespace: default}
spec:
  selector: {matchLabels: {version: v1}}
  rules: [{to: [{operation: {methods: [GET]}}]}]
"""


def push_of(*docs: str) -> tuple[ConfigStore, PushContext]:
    store = ConfigStore()
    text = "\n---\n".join(textwrap.dedent(d).strip("\n") for d in (MESH, *docs))
    result = parse_text(text, "mesh.yaml")
    assert not result.errors, [str(e) for e in result.errors]
    store.set_origin("mesh.yaml", result.configs)
    return store, PushContext.build(store.snapshot(), MeshConfig())


def proxy(name: str, ip: str, sds: bool = True, **labels: str) -> Proxy:
    meta = struct_pb2.Struct()
    meta.update(
        {
            "NAMESPACE": "default",
            "LABELS": labels,
            "INTERCEPTION_MODE": "REDIRECT",
            **({"SDS": "true"} if sds else {}),
        }
    )
    node_id = f"sidecar~{ip}~{name}.default~default.svc.cluster.local"
    return Proxy.from_node(base_pb2.Node(id=node_id, metadata=meta))


def lds(gen: ConfigGenerator, push: PushContext, p: Proxy) -> object:
    out = gen.generate(typeurls.LISTENER, p, push, None, None)
    assert out is not None
    return out.resources


def test_listeners_shared_unless_a_policy_selects_differently() -> None:
    _, push = push_of(SELECTS_V1)
    gen = ConfigGenerator()
    # Neither runs a service instance (no IP match); they differ only in labels.
    a = proxy("a", "10.9.0.1", app="x", version="v1")
    b = proxy("b", "10.9.0.2", app="y", version="v1")
    c = proxy("c", "10.9.0.3", app="x", version="v2")
    assert lds(gen, push, a) is lds(gen, push, b)  # same policies: shared bytes
    assert lds(gen, push, a) is not lds(gen, push, c)


def test_unselected_labels_do_not_split_listeners() -> None:
    _, push = push_of()
    gen = ConfigGenerator()
    assert lds(gen, push, proxy("a", "10.9.0.1", app="x")) is lds(
        gen, push, proxy("b", "10.9.0.2", app="y")
    )


def test_policy_content_is_part_of_the_key() -> None:
    _, push = push_of(SELECTS_V1)
    _, push2 = push_of(SELECTS_V1.replace("GET", "POST"))
    p = proxy("a", "10.9.0.1", version="v1")
    assert push.security.inbound_key("default", p.labels) != push2.security.inbound_key(
        "default", p.labels
    )


def test_clusters_differ_by_sds_capability_only() -> None:
    _, push = push_of()
    gen = ConfigGenerator()
    with_sds = gen.generate(typeurls.CLUSTER, proxy("a", "10.9.0.1"), push, None, None)
    with_sds2 = gen.generate(typeurls.CLUSTER, proxy("b", "10.9.0.2", app="z"), push, None, None)
    plain = gen.generate(typeurls.CLUSTER, proxy("c", "10.9.0.3", sds=False), push, None, None)
    assert with_sds is not None and with_sds2 is not None and plain is not None
    assert with_sds.resources is with_sds2.resources
    assert with_sds.resources is not plain.resources


def _endpoint_change(before: str, after: str) -> PushContext:
    store, push = push_of(before)
    result = parse_text(MESH + "\n---\n" + textwrap.dedent(after), "mesh.yaml")
    changed = store.set_origin("mesh.yaml", result.configs)
    return push.with_endpoint_changes(store.snapshot(), changed)


WE = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-2, namespace: default}
spec: {address: ADDR, serviceAccount: SA, labels: {app: reviews, security.istio.io/tlsMode: istio}}
"""


def test_new_identity_forces_a_full_push_new_address_does_not() -> None:
    before = WE.replace("ADDR", "10.0.0.2").replace("SA", "reviews")
    moved = _endpoint_change(before, before.replace("10.0.0.2", "10.0.0.3"))
    assert moved.changed_hosts == {"reviews.default.svc.cluster.local"}
    assert not moved.requires_full_push
    renamed = _endpoint_change(before, WE.replace("ADDR", "10.0.0.2").replace("SA", "canary"))
    assert renamed.requires_full_push
    assert renamed.service_identities(renamed.services["reviews.default.svc.cluster.local"]) == (
        "spiffe://cluster.local/ns/default/sa/canary",
        "spiffe://cluster.local/ns/default/sa/reviews",
    )


# --- analysis ------------------------------------------------------------------------------


def findings(*docs: str) -> list[str]:
    _, push = push_of(*docs)
    return [
        f"{m.code} {m.kind}/{m.object_name} {m.field}"
        for m in analyze(push)
        if m.kind in ("AuthorizationPolicy", "PeerAuthentication", "Sidecar")
    ]


def test_analysis_of_authorization_policies() -> None:
    out = findings(
        """
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: odd, namespace: default}
        spec:
          targetRefs: [{kind: Gateway, name: gw}]
          rules:
          - when: [{key: request.nope, values: [x]}]
          - from: [{source: {requestPrincipals: ['*'], ipBlocks: [bogus]}}]
            to: [{operation: {ports: ['http']}}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ext, namespace: default}
        spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}
        """
    )
    assert out == [
        "MP0003 AuthorizationPolicy/ext spec.provider",
        "MP0004 AuthorizationPolicy/odd spec.rules[0].when",
        "MP0003 AuthorizationPolicy/odd spec.rules[1]",
        "MP0004 AuthorizationPolicy/odd spec.rules[1].from[0].source.ipBlocks",
        "MP0004 AuthorizationPolicy/odd spec.rules[1].to[0].operation.ports",
        "MP0003 AuthorizationPolicy/odd spec.targetRefs",
    ]


def test_analysis_of_peer_authentications_and_sidecar_tls() -> None:
    out = findings(
        """
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: a, namespace: default}
        spec: {mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: b, namespace: default}
        spec: {mtls: {mode: DISABLE}}
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: root-sel, namespace: istio-system}
        spec: {selector: {matchLabels: {app: x}}, mtls: {mode: STRICT}}
        ---
        apiVersion: networking.istio.io/v1
        kind: Sidecar
        metadata: {name: tls, namespace: default}
        spec:
          ingress:
          - port: {number: 9443, protocol: HTTPS, name: https}
            defaultEndpoint: 127.0.0.1:8443
            tls: {mode: MUTUAL, serverCertificate: /c.pem, privateKey: /k.pem}
          - port: {number: 9444, protocol: HTTPS, name: https2}
            defaultEndpoint: 127.0.0.1:8444
            tls: {mode: ISTIO_MUTUAL}
        """
    )
    assert out == [
        "MP0005 PeerAuthentication/a spec",
        "MP0003 PeerAuthentication/a spec.portLevelMtls",
        "MP0005 PeerAuthentication/b spec",
        "MP0003 PeerAuthentication/root-sel spec.selector",
        "IST0101 Sidecar/tls spec.ingress[0].tls",
        "MP0003 Sidecar/tls spec.ingress[1].tls",
    ]
