"""Config analysis: Istio's codes for references to nothing, conflicts, dead rules."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path

import pytest
import structlog

from meshpilot import analysis
from meshpilot.analysis import Message, analyze, reporter
from meshpilot.analysis.reporter import FindingsReporter
from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.config import ConfigKey, kinds
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings
from meshpilot.translators.routes import build_route_configs
from tests.samples import ISTIO_SAMPLES
from tests.unit.translators._helpers import sidecar

SAMPLES = ISTIO_SAMPLES

WORKLOADS = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: default}
spec: {address: 10.1.0.1, labels: {app: reviews, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: default}
spec: {address: 10.1.0.2, labels: {app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-v1, namespace: default}
spec: {address: 10.1.0.3, labels: {app: ratings, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: details-v1, namespace: default}
spec: {address: 10.1.0.4, labels: {app: details, version: v1}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: productpage-v1, namespace: default}
spec: {address: 10.1.0.5, labels: {app: productpage, version: v1}}
"""


def sample(relpath: str) -> str:
    path = SAMPLES / relpath
    if not path.is_file():
        raise RuntimeError(f"Istio sample missing: expected {path} (tests/data/istio-samples)")
    return path.read_text()


def push_of(*docs: str) -> PushContext:
    text = "\n---\n".join(
        [sample("bookinfo/platform/kube/bookinfo.yaml"), WORKLOADS]
        + [textwrap.dedent(d).strip("\n") for d in docs]
    )
    result = parse_text(text, "mesh.yaml")
    assert result.errors == [], [str(e) for e in result.errors]
    store = ConfigStore()
    store.set_origin("mesh.yaml", result.configs)
    return PushContext.build(store.snapshot(), MeshConfig())


def codes(messages: list[Message]) -> list[tuple[str, str, str]]:
    return [(m.code, m.object_name, m.field) for m in messages]


def test_bookinfo_samples_are_clean_apart_from_pods_that_do_not_exist() -> None:
    msgs = analyze(
        push_of(
            sample("bookinfo/networking/destination-rule-all.yaml"),
            sample("bookinfo/networking/virtual-service-reviews-test-v2.yaml"),
            sample("bookinfo/networking/virtual-service-ratings-test-delay.yaml"),
        )
    )
    # Only the subsets no WorkloadEntry here stands in for: IST0173, as istioctl says.
    assert {(m.code, m.object_name, m.field) for m in msgs} == {
        ("IST0173", "details", "spec.subsets[1]"),
        ("IST0173", "ratings", "spec.subsets[1]"),
        ("IST0173", "ratings", "spec.subsets[2]"),
        ("IST0173", "ratings", "spec.subsets[3]"),
        ("IST0173", "reviews", "spec.subsets[2]"),
    }
    v3 = next(m for m in msgs if m.object_name == "reviews")
    assert v3.level == "Error"
    assert v3.name == "DestinationRuleSubsetNotSelectPods"
    assert "The Subset v3 defined in the DestinationRule does not select any pods" in v3.message


def test_unknown_subset_without_destination_rule() -> None:
    (msg,) = analyze(push_of(sample("bookinfo/networking/virtual-service-reviews-v3.yaml")))
    assert (msg.code, msg.name, msg.level) == ("IST0101", "ReferencedResourceNotFound", "Error")
    assert (msg.kind, msg.namespace, msg.object_name) == ("VirtualService", "default", "reviews")
    assert msg.field == "spec.http[0].route[0].destination.subset"
    assert msg.origin.startswith("mesh.yaml#")
    assert (
        "Referenced host+subset in destinationrule not found: "
        "'reviews.default.svc.cluster.local+v3'"
    ) in msg.message
    assert "no DestinationRule" in msg.message
    d = msg.to_dict()
    assert d["object"] == {"kind": "VirtualService", "namespace": "default", "name": "reviews"}
    assert set(d) == {"code", "name", "level", "object", "origin", "field", "message"}
    assert str(msg).startswith("Error [IST0101] (VirtualService default/reviews mesh.yaml#")


def test_split_to_a_subset_the_rule_lacks_says_which_share_gets_503() -> None:
    """80 v1 / 20 v3 with a DestinationRule that has v1 and v2: the finding names the
    subset, the rule that lacks it, and the 20% of requests that get 503."""
    (msg,) = analyze(
        push_of(
            """
            apiVersion: networking.istio.io/v1
            kind: DestinationRule
            metadata: {name: reviews, namespace: default}
            spec:
              host: reviews
              subsets:
              - {name: v1, labels: {version: v1}}
              - {name: v2, labels: {version: v2}}
            """,
            """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews, namespace: default}
            spec:
              hosts: [reviews]
              http:
              - route:
                - destination: {host: reviews, subset: v1}
                  weight: 80
                - destination: {host: reviews, subset: v3}
                  weight: 20
            """,
        )
    )
    assert (msg.code, msg.field) == ("IST0101", "spec.http[0].route[1].destination.subset")
    assert msg.message == (
        "Referenced host+subset in destinationrule not found: "
        "'reviews.default.svc.cluster.local+v3' (DestinationRule default/reviews defines "
        "v1, v2 but not v3), so its cluster does not exist: its 20% share of requests "
        "(weight 20 of 100) gets 503 (no cluster)"
    )


def test_unknown_hosts_subsets_ports_and_gateways() -> None:
    msgs = analyze(
        push_of(
            sample("bookinfo/networking/destination-rule-reviews.yaml"),
            """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: broken, namespace: default}
            spec:
              hosts: [reviews]
              gateways: [mesh, missing-gateway]
              http:
              - match: [{headers: {end-user: {exact: jason}}}]
                mirror: {host: mirror-target}
                route:
                - destination: {host: reviews, subset: v4}
                  weight: 50
                - destination: {host: reviewz}
                  weight: 50
              - route:
                - destination: {host: ratings, port: {number: 9999}}
              tcp:
              - route: [{destination: {host: ratings.other.svc.cluster.local}}]
            """,
        )
    )
    broken = [m for m in msgs if m.object_name == "broken"]
    assert codes(broken) == [
        ("IST0101", "broken", "spec.gateways[1]"),
        ("IST0101", "broken", "spec.http[0].mirror.host"),
        ("IST0101", "broken", "spec.http[0].route[0].destination.subset"),
        ("IST0101", "broken", "spec.http[0].route[1].destination.host"),
        ("IST0101", "broken", "spec.http[1].route[0].destination.port.number"),
        ("IST0101", "broken", "spec.tcp[0].route[0].destination.host"),
    ]
    subset = broken[2].message
    assert "'reviews.default.svc.cluster.local+v4'" in subset
    assert "DestinationRule default/reviews defines v1, v2, v3 but not v4" in subset
    assert subset.endswith("its 50% share of requests (weight 50 of 100) gets 503 (no cluster)")
    assert "'reviewz.default.svc.cluster.local'" in broken[3].message
    assert broken[3].message.endswith(
        "its 50% share of requests (weight 50 of 100) gets 503 (no cluster)"
    )
    assert "ports are 9080" in broken[4].message
    assert broken[4].message.endswith("every request this rule routes gets 503")
    assert broken[1].message.endswith("nothing is mirrored to it")
    assert broken[5].message.endswith("connections go to BlackHoleCluster")
    assert "Referenced gateway not found: 'default/missing-gateway'" in broken[0].message


def test_conflicting_virtual_services_name_the_winner() -> None:
    older = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews-b, namespace: default, creationTimestamp: '2024-01-01T00:00:00Z'}
    spec:
      hosts: [reviews]
      http: [{route: [{destination: {host: reviews}}]}]
    """
    newer = older.replace("reviews-b", "reviews-a").replace("2024-01-01", "2024-02-01")
    msgs = [m for m in analyze(push_of(older, newer)) if m.code == "IST0109"]
    assert [m.object_name for m in msgs] == ["reviews-a", "reviews-b"]
    assert all(m.name == "ConflictingMeshGatewayVirtualServiceHosts" for m in msgs)
    assert msgs[0].message == msgs[1].message
    assert "define the same host reviews.default.svc.cluster.local" in msgs[0].message
    assert "meshpilot uses default/reviews-b (the oldest" in msgs[0].message


def test_export_to_separates_virtual_services() -> None:
    private = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: private, namespace: other}
    spec:
      hosts: [reviews.default.svc.cluster.local]
      exportTo: ["."]
      http: [{route: [{destination: {host: reviews.default.svc.cluster.local}}]}]
    """
    public = private.replace("private", "public").replace('exportTo: ["."]', 'exportTo: ["*"]')
    gateway_only = private.replace("private", "gw").replace(
        'exportTo: ["."]', "gateways: [other/ingress]"
    )
    msgs = analyze(push_of(public, gateway_only))
    assert "IST0109" not in {m.code for m in msgs}
    # Both visible from namespace other: a conflict there.
    msgs = analyze(push_of(private, public))
    assert {m.object_name for m in msgs if m.code == "IST0109"} == {"private", "public"}


def test_conflicting_destination_rules() -> None:
    first = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: reviews-1, namespace: default, creationTimestamp: '2024-01-01T00:00:00Z'}
    spec:
      host: reviews
      subsets: [{name: v1, labels: {version: v1}}]
    """
    second = first.replace("reviews-1", "reviews-2").replace("2024-01-01", "2024-03-01")
    msgs = [m for m in analyze(push_of(first, second)) if m.code == "MP0001"]
    assert [m.object_name for m in msgs] == ["reviews-1", "reviews-2"]
    assert "meshpilot uses default/reviews-1" in msgs[0].message
    assert "Istio would merge" in msgs[0].message


def test_unreachable_rules_zero_weights_and_unsupported_fields() -> None:
    msgs = analyze(
        push_of(
            sample("bookinfo/networking/destination-rule-all.yaml"),
            """
            apiVersion: networking.istio.io/v1
            kind: VirtualService
            metadata: {name: reviews, namespace: default}
            spec:
              hosts: [reviews]
              http:
              - match: [{uri: {prefix: /a}}]
                redirect: {uri: /b, redirectCode: 300}
              - fault: {delay: {exponentialDelay: 1s}, abort: {grpcStatus: NOPE}}
                route:
                - destination: {host: reviews, subset: v1}
                - destination: {host: reviews, subset: v2}
              - delegate: {name: child}
              tcp:
              - match: [{destinationSubnets: [10.0.0.0/8]}]
                route: [{destination: {host: reviews}}]
            """,
        )
    )
    vs = [(m.code, m.field) for m in msgs if m.kind == "VirtualService"]
    assert vs == [
        ("MP0003", "spec.http[0].redirect.redirectCode"),
        ("MP0003", "spec.http[1].fault.abort"),
        ("MP0003", "spec.http[1].fault.delay"),
        ("MP0002", "spec.http[1].route"),
        ("IST0130", "spec.http[2]"),
        ("MP0003", "spec.http[2].delegate"),
        ("MP0003", "spec.tcp[0].match[0].destinationSubnets"),
    ]


def test_multi_port_destination_without_port() -> None:
    two_ports = """
    apiVersion: v1
    kind: Service
    metadata: {name: multi, namespace: default}
    spec:
      selector: {app: multi}
      ports: [{name: http, port: 8000}, {name: http-admin, port: 8001}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: multi, namespace: default}
    spec:
      hosts: [multi]
      http: [{route: [{destination: {host: multi}}]}]
    """
    (msg,) = analyze(push_of(two_ports))
    assert (msg.code, msg.field) == ("IST0112", "spec.http[0].route[0].destination.port")
    assert "[8000, 8001]" in msg.message


def test_analysis_is_deterministic() -> None:
    docs = (
        sample("bookinfo/networking/destination-rule-all.yaml"),
        sample("bookinfo/networking/virtual-service-all-v1.yaml"),
        sample("bookinfo/networking/virtual-service-reviews-v3.yaml").replace(
            "name: reviews", "name: reviews-v3"
        ),
    )
    assert analyze(push_of(*docs)) == analyze(push_of(*docs))


async def test_configz_lists_analysis_once_per_context() -> None:
    server = MeshServer(Settings(), MeshConfig())
    assert server.configz()["analysis"] == []  # no context yet
    text = "\n---\n".join(
        [
            sample("bookinfo/platform/kube/bookinfo.yaml"),
            sample("bookinfo/networking/virtual-service-reviews-v3.yaml"),
        ]
    )
    server.store.set_origin("mesh.yaml", parse_text(text, "mesh.yaml").configs)
    await server.pusher.init()
    first = server.configz()
    (finding,) = first["analysis"]
    assert finding["code"] == "IST0101"
    assert finding["object"] == {
        "kind": "VirtualService",
        "namespace": "default",
        "name": "reviews",
    }
    assert finding["field"] == "spec.http[0].route[0].destination.subset"
    # Same context: the same list, not a second analysis.
    cached = server.analysis.messages
    server.configz()
    assert server.analysis.messages is cached
    if server.analysis_task is not None:
        server.analysis_task.cancel()


SUBSET_V3_RULE = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v3, labels: {version: v3}}
"""

REVIEWS_V3 = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v3, namespace: default}
spec: {address: 10.1.0.9, labels: {app: reviews, version: v3}}
"""


def _analysis_events(logs: list[dict[str, object]]) -> list[tuple[object, object, str]]:
    return [
        (e["event"], e["code"], str(e["finding"]).split(" mesh.yaml#", 1)[0])
        for e in logs
        if str(e["event"]).startswith("config analysis")
    ]


async def test_findings_are_logged_once_when_they_appear_and_once_when_they_clear() -> None:
    """Logged after each push without anyone reading /debug/configz: a full push that
    adds a subset clears the reference to it; an endpoint-only push that adds the
    subset's first endpoint clears IST0173."""
    server = MeshServer(Settings(), MeshConfig())

    def load(*docs: str) -> None:
        text = "\n---\n".join(
            [sample("bookinfo/platform/kube/bookinfo.yaml"), WORKLOADS]
            + [textwrap.dedent(d) for d in docs]
        )
        server.store.set_origin("mesh.yaml", parse_text(text, "mesh.yaml").configs)

    async def push(request: PushRequest) -> None:
        await server.pusher.init(request)
        assert server.analysis_task is not None
        await server.analysis_task

    vs = sample("bookinfo/networking/virtual-service-reviews-v3.yaml")
    with structlog.testing.capture_logs() as logs:
        load(vs)
        await push(PushRequest(full=True, reasons=frozenset({"init"})))
        # A second push of the same findings logs nothing more.
        await push(PushRequest(full=True, reasons=frozenset({"config"})))
        assert _analysis_events(logs) == [
            (
                "config analysis finding",
                "IST0101",
                "Error [IST0101] (VirtualService default/reviews",
            ),
        ]
        logs.clear()

        load(vs, SUBSET_V3_RULE)
        await push(PushRequest(full=True, reasons=frozenset({"config"})))
        assert _analysis_events(logs) == [
            (
                "config analysis finding",
                "IST0173",
                "Error [IST0173] (DestinationRule default/reviews",
            ),
            (
                "config analysis finding cleared",
                "IST0101",
                "Error [IST0101] (VirtualService default/reviews",
            ),
        ]
        logs.clear()

        load(vs, SUBSET_V3_RULE, REVIEWS_V3)
        key = ConfigKey(kinds.WORKLOAD_ENTRY, "default", "reviews-v3")
        await push(PushRequest.for_changes(frozenset({key})))
        assert server.pusher.current is not None
        assert server.pusher.current.changed_hosts is not None  # an endpoint-only context
        assert _analysis_events(logs) == [
            (
                "config analysis finding cleared",
                "IST0173",
                "Error [IST0173] (DestinationRule default/reviews",
            ),
        ]
    assert server.configz()["analysis"] == []


def test_endpoint_only_contexts_reuse_config_findings(monkeypatch: pytest.MonkeyPatch) -> None:
    """An endpoint-only context (a WorkloadEntry changed) reuses the config findings
    and redoes the endpoint findings of the changed host only; the result equals a
    full analysis of that context."""
    config_calls: list[str] = []
    host_calls: list[list[str]] = []

    def counting_config(push: PushContext) -> list[Message]:
        config_calls.append(push.version)
        return analysis.config_findings(push)

    def counting_hosts(push: PushContext, hosts: Iterable[str]) -> dict[str, list[Message]]:
        host_calls.append(sorted(hosts))
        return analysis.endpoint_findings_by_host(push, hosts)

    monkeypatch.setattr(reporter, "config_findings", counting_config)
    monkeypatch.setattr(reporter, "endpoint_findings_by_host", counting_hosts)
    base = [sample("bookinfo/platform/kube/bookinfo.yaml"), WORKLOADS, SUBSET_V3_RULE]
    store = ConfigStore()
    store.set_origin("mesh.yaml", parse_text("\n---\n".join(base), "mesh.yaml").configs)
    first = PushContext.build(store.snapshot(), MeshConfig())
    found = FindingsReporter()
    found.update(first)
    assert [m.code for m in found.messages] == ["IST0173"]  # no reviews v3 endpoint yet

    moved = WORKLOADS.replace("version: v2}", "version: v3}")
    text = "\n---\n".join([base[0], moved, SUBSET_V3_RULE])
    store.set_origin("mesh.yaml", parse_text(text, "mesh.yaml").configs)
    key = ConfigKey(kinds.WORKLOAD_ENTRY, "default", "reviews-v2")
    second = first.with_endpoint_changes(store.snapshot(), frozenset({key}))
    appeared, cleared = found.update(second)
    assert config_calls == [first.version]
    assert host_calls[1:] == [["reviews.default.svc.cluster.local"]]
    assert (appeared, [m.code for m in cleared]) == ([], ["IST0173"])
    assert found.messages == analyze(second) == []
    found.update(push_of())
    assert len(config_calls) == 2


def test_analysis_imports_neither_translators_nor_upper_floors() -> None:
    """Analysis sits on api/ and model/: importing it first thing in a fresh
    interpreter loads no translator, xDS or server module."""
    probe = (
        "import sys, meshpilot.analysis; "
        "print(sorted(m for m in sys.modules if m.startswith("
        "('meshpilot.translators', 'meshpilot.xds', 'meshpilot.serve'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_weights_not_summing_to_100_are_reported_and_kept() -> None:
    """Istio accepts any sum (Envoy divides each weight by it); the translation keeps
    the weights as written and analysis names the rule and the sum."""
    vs = """
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: reviews, namespace: default}
    spec:
      hosts: [reviews]
      http:
      - match: [{uri: {prefix: /a}}]
        route:
        - destination: {host: reviews, subset: v1}
          weight: 80
        - destination: {host: reviews, subset: v2}
          weight: 20
      - route:
        - destination: {host: reviews, subset: v1}
          weight: 60
        - destination: {host: reviews, subset: v2}
          weight: 60
      tcp:
      - route:
        - destination: {host: reviews, subset: v1}
          weight: 1
        - destination: {host: reviews, subset: v2}
          weight: 3
    """
    push = push_of(sample("bookinfo/networking/destination-rule-all.yaml"), vs)
    found = [m for m in analyze(push) if m.code == "MP0006"]
    assert [(m.name, m.level, m.object_name, m.field) for m in found] == [
        ("RouteWeightsNotSumTo100", "Warning", "reviews", "spec.http[1].route"),
        ("RouteWeightsNotSumTo100", "Warning", "reviews", "spec.tcp[0].route"),
    ]
    assert found[0].message == (
        "the weights of route spec.http[1] (60, 60) sum to 120, not 100; accepted as in "
        "Istio: each destination gets its weight divided by 120 (50%, 50%)"
    )
    assert "sum to 4" in found[1].message and "(25%, 75%)" in found[1].message

    (rc,) = build_route_configs(push, sidecar(name="productpage-v1"), ["9080"])
    (vhost,) = [vh for vh in rc.virtual_hosts if vh.name.startswith("reviews.")]
    split = vhost.routes[1].route.weighted_clusters
    assert [c.weight.value for c in split.clusters] == [60, 60]
    assert not split.HasField("total_weight")  # Envoy divides by the sum


STRICT_REVIEWS = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: reviews-strict, namespace: default}
spec:
  selector: {matchLabels: {app: reviews}}
  mtls: {mode: STRICT}
"""


def test_strict_workload_without_tls_mode_label_is_reported() -> None:
    """reviews-v1 carries the label, reviews-v2 does not: only v2 gets plaintext from
    auto mTLS, which its STRICT sidecar refuses."""
    labelled = WORKLOADS.replace(
        "labels: {app: reviews, version: v1}",
        "labels: {app: reviews, version: v1, security.istio.io/tlsMode: istio}",
    )
    text = "\n---\n".join(
        [sample("bookinfo/platform/kube/bookinfo.yaml"), labelled, textwrap.dedent(STRICT_REVIEWS)]
    )
    result = parse_text(text, "mesh.yaml")
    store = ConfigStore()
    store.set_origin("mesh.yaml", result.configs)
    found = [
        m for m in analyze(PushContext.build(store.snapshot(), MeshConfig())) if m.code == "MP0007"
    ]
    assert [(m.name, m.level, m.kind, m.object_name, m.field) for m in found] == [
        ("StrictWorkloadWithoutTlsModeLabel", "Error", "WorkloadEntry", "reviews-v2", "spec.labels")
    ]
    assert found[0].message == (
        "WorkloadEntry default/reviews-v2 is STRICT under PeerAuthentication "
        "default/reviews-strict, but has no label security.istio.io/tlsMode: istio, so auto "
        "mTLS sends it plaintext and its sidecar refuses those connections. If it runs a "
        "sidecar, add 'security.istio.io/tlsMode: istio' to spec.labels (Istio's injector "
        "adds it to pods)."
    )


def test_strict_port_and_service_entry_endpoints_and_explicit_istio_mutual() -> None:
    port_only = """
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: ratings-port, namespace: default}
    spec:
      selector: {matchLabels: {app: ratings}}
      portLevelMtls: {"9080": {mode: STRICT}}
    """
    se = """
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: legacy, namespace: default}
    spec:
      hosts: [legacy.internal]
      location: MESH_INTERNAL
      resolution: STATIC
      ports: [{number: 80, name: http, protocol: HTTP}]
      endpoints: [{address: 10.9.0.1, labels: {app: legacy}}]
    """
    ns_strict = """
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: default}
    spec: {mtls: {mode: STRICT}}
    """
    # The details DestinationRule asks for ISTIO_MUTUAL: mTLS whatever the labels.
    details_mutual = """
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: details, namespace: default}
    spec:
      host: details
      trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
    """
    msgs = analyze(push_of(port_only, se, ns_strict, details_mutual))
    found = {(m.kind, m.object_name): m.message for m in msgs if m.code == "MP0007"}
    assert sorted(found) == [
        ("ServiceEntry", "legacy"),
        ("WorkloadEntry", "productpage-v1"),
        ("WorkloadEntry", "ratings-v1"),
        ("WorkloadEntry", "reviews-v1"),
        ("WorkloadEntry", "reviews-v2"),
    ]
    assert (
        "STRICT on port 9080 under PeerAuthentication default/ratings-port"
        in found[("WorkloadEntry", "ratings-v1")]
    )
    assert found[("ServiceEntry", "legacy")].startswith(
        "ServiceEntry default/legacy endpoint 10.9.0.1 is STRICT under PeerAuthentication "
        "default/default"
    )
