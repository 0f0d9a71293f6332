"""examples/bookinfo-local: parses with no errors, Istio's manifests in it are
unchanged, and the mesh it describes is the one the traffic tests rely on."""

from __future__ import annotations

from pathlib import Path

from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.discovery.files import FileSource
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.service import labels_match
from tests.samples import ISTIO_SAMPLES

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "bookinfo-local"
SAMPLES = ISTIO_SAMPLES

WORKLOADS = {
    "productpage-v1": ("productpage", "v1", "127.0.5.1", "127.0.6.1"),
    "details-v1": ("details", "v1", "127.0.5.2", "127.0.6.2"),
    "ratings-v1": ("ratings", "v1", "127.0.5.3", "127.0.6.3"),
    "reviews-v1": ("reviews", "v1", "127.0.5.4", "127.0.6.4"),
    "reviews-v2": ("reviews", "v2", "127.0.5.5", "127.0.6.5"),
    "reviews-v3": ("reviews", "v3", "127.0.5.6", "127.0.6.6"),
    "tcp-echo-v1": ("tcp-echo", "v1", "127.0.5.7", None),
    "tcp-echo-v2": ("tcp-echo", "v2", "127.0.5.8", None),
}


def _fqdn(name: str) -> str:
    return f"{name}.default.svc.cluster.local"


async def _push() -> PushContext:
    store = ConfigStore()
    await FileSource(store, [EXAMPLE]).load_initial()
    assert [str(e) for e in store.errors()] == []
    return PushContext.build(store.snapshot(), MeshConfig())


def _proxy(name: str) -> Proxy:
    app, version, ip, _ = WORKLOADS[name]
    return Proxy(
        id=f"sidecar~{ip}~{name}.default~default.svc.cluster.local",
        type="sidecar",
        ip_addresses=(ip,),
        workload_name=name,
        namespace="default",
        dns_domain="default.svc.cluster.local",
        labels={"app": app, "version": version},
        interception_mode="NONE",
    )


def test_every_file_parses_without_errors() -> None:
    files = sorted(p for p in EXAMPLE.iterdir() if p.suffix == ".yaml")
    assert [p.name for p in files] == [
        "bookinfo.yaml",
        "sidecars.yaml",
        "tcp-echo-services.yaml",
        "workloads.yaml",
    ]
    for path in files:
        result = parse_text(path.read_text(), str(path))
        assert [str(e) for e in result.errors] == [], path.name
        assert result.configs, path.name


def test_istio_manifests_are_copied_unchanged() -> None:
    pairs = {
        "bookinfo.yaml": SAMPLES / "bookinfo/platform/kube/bookinfo.yaml",
        "tcp-echo-services.yaml": SAMPLES / "tcp-echo/tcp-echo-services.yaml",
    }
    for name, original in pairs.items():
        assert original.is_file(), f"Istio sample corpus missing: {original}"
        assert (EXAMPLE / name).read_bytes() == original.read_bytes(), name


def test_workload_entries_and_sidecars() -> None:
    path = EXAMPLE / "workloads.yaml"
    entries = {c.name: c.spec for c in parse_text(path.read_text(), str(path)).configs}
    assert set(entries) == set(WORKLOADS)
    for name, (app, version, ip, _) in WORKLOADS.items():
        assert entries[name].address == ip
        assert dict(entries[name].labels) == {"app": app, "version": version}
    path = EXAMPLE / "sidecars.yaml"
    sidecars = {c.name: c.spec for c in parse_text(path.read_text(), str(path)).configs}
    assert set(sidecars) == {n for n, w in WORKLOADS.items() if w[3] is not None}
    for name, spec in sidecars.items():
        app, version, _, bind = WORKLOADS[name]
        assert spec.workload_selector is not None
        assert dict(spec.workload_selector.labels) == {"app": app, "version": version}
        [egress] = spec.egress
        assert (egress.bind, egress.capture_mode, egress.port) == (bind, "NONE", None)


async def test_push_context_has_every_service_with_its_endpoints() -> None:
    push = await _push()
    expected = {
        "productpage": {"127.0.5.1"},
        "details": {"127.0.5.2"},
        "ratings": {"127.0.5.3"},
        "reviews": {"127.0.5.4", "127.0.5.5", "127.0.5.6"},
    }
    for name, addresses in expected.items():
        assert _fqdn(name) in push.services
        eps = push.service_endpoints(_fqdn(name), 9080)
        assert {e.address for e in eps} == addresses, name
        assert {e.port for e in eps} == {9080}, name
    for port in (9000, 9001):
        eps = push.service_endpoints(_fqdn("tcp-echo"), port)
        assert {(e.address, e.port) for e in eps} == {("127.0.5.7", port), ("127.0.5.8", port)}


async def test_destination_rule_all_subsets_select_one_version_each() -> None:
    push = await _push()
    path = SAMPLES / "bookinfo/networking/destination-rule-all.yaml"
    rules = {c.name: c.spec for c in parse_text(path.read_text(), str(path)).configs}
    for subset in rules["reviews"].subsets:
        eps = push.service_endpoints(_fqdn("reviews"), 9080)
        chosen = {e.labels["version"] for e in eps if labels_match(subset.labels, e.labels)}
        assert chosen == {subset.name}
    path = SAMPLES / "tcp-echo/tcp-echo-all-v1.yaml"
    [rule] = [
        c.spec
        for c in parse_text(path.read_text(), str(path)).configs
        if c.kind == "DestinationRule"
    ]
    for subset in rule.subsets:
        eps = push.service_endpoints(_fqdn("tcp-echo"), 9000)
        assert [e.address for e in eps if labels_match(subset.labels, e.labels)] == [
            WORKLOADS[f"tcp-echo-{subset.name}"][2]
        ]


async def test_each_sidecar_sees_the_mesh_on_its_own_egress_address() -> None:
    push = await _push()
    for name, (_, _, _, bind) in WORKLOADS.items():
        if bind is None:
            continue
        scope = push.sidecar_scope(_proxy(name))
        assert scope.sidecar is not None and scope.sidecar.name == name
        [egress] = scope.egress
        assert egress.bind == bind
        assert {s.hostname for s in scope.services} == {
            _fqdn(n) for n in ("productpage", "details", "ratings", "reviews", "tcp-echo")
        }
