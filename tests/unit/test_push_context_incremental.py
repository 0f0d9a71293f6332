"""Endpoint-only contexts equal fully rebuilt ones on everything that reads endpoints.

A chain of incremental contexts (each derived from the previous one, never rebuilt)
follows random WorkloadEntry changes: adds, address moves, deletes, relabels that
move an entry between services, metadata labels overridden by spec labels, entries
in another namespace, several changes merged into one push. A second chain follows
random Kubernetes EndpointSlice, Pod, Node and Namespace changes (slices moving
between services, endpoints naming missing Pods, not-ready and terminating
endpoints, Pods moving between Nodes), mixed with WorkloadEntry changes. After every step it is
compared with `PushContext.build` of the same snapshot, field by field: endpoints
per host and port, changed hosts, service instances per proxy IP, SPIFFE identities,
whether clusters must be rebuilt, ClusterLoadAssignments, and analysis findings.
"""

from __future__ import annotations

import random
import textwrap
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from meshpilot.analysis import analyze
from meshpilot.analysis.reporter import FindingsReporter
from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.config import Config, ConfigKey
from meshpilot.discovery.kube.convert import to_config
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.translators import endpoints as eds
from meshpilot.translators import naming

MESH = MeshConfig()
APPS = ("reviews", "ratings", "details", "vm")
VERSIONS = ("v1", "v2")
# Few addresses, so that entries share IPs and one IP serves several services.
ADDRESSES = tuple(f"10.0.0.{i}" for i in range(1, 9))
NAMESPACES = ("bookinfo", "other")

SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: bookinfo}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: web}, {name: grpc, port: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews-v2, namespace: bookinfo}
spec:
  selector: {app: reviews, version: v2}
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: bookinfo}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: bookinfo}
spec:
  selector: {app: details}
  clusterIP: None
  ports: [{name: tcp, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: other}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: vms, namespace: bookinfo}
spec:
  hosts: [vm.bookinfo.internal]
  resolution: STATIC
  ports: [{number: 8080, name: http}]
  workloadSelector: {labels: {app: vm}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: inline, namespace: bookinfo}
spec:
  hosts: [inline.bookinfo.internal]
  resolution: STATIC
  ports: [{number: 7070, name: tcp}]
  endpoints: [{address: 10.0.0.1, labels: {app: inline}}, {address: 10.0.0.2}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: bookinfo}
spec:
  host: ratings
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
  subsets: [{name: v1, labels: {version: v1}}]
"""


def _entry(rng: random.Random, name: str, namespace: str) -> str:
    """A WorkloadEntry with random address, labels (some in metadata only, some in
    spec overriding metadata), service account, named port and sidecar label."""
    spec_labels: dict[str, str] = {"app": rng.choice(APPS)}
    meta_labels: dict[str, str] = {}
    if rng.random() < 0.6:
        spec_labels["version"] = rng.choice(VERSIONS)
    if rng.random() < 0.3:
        # Metadata label the spec overrides: selectors must see the spec's value.
        meta_labels["app"] = rng.choice(APPS)
    if rng.random() < 0.3:
        meta_labels["version"] = rng.choice(VERSIONS)
    if rng.random() < 0.5:
        spec_labels["security.istio.io/tlsMode"] = "istio"
    spec: dict[str, Any] = {"address": rng.choice(ADDRESSES), "labels": spec_labels}
    if rng.random() < 0.5:
        spec["ports"] = {"web": rng.choice((8000, 8001))}
    if rng.random() < 0.5:
        spec["serviceAccount"] = rng.choice(("reviews", "ratings"))
    if rng.random() < 0.2:
        spec["locality"] = "us-east/zone-a"
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if meta_labels:
        meta["labels"] = meta_labels
    return (
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        f"metadata: {_flow(meta)}\nspec: {_flow(spec)}\n"
    )


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f'"{k}": {_flow(v)}' for k, v in value.items()) + "}"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _configs(text: str) -> list[Config]:
    result = parse_text(text, "mesh.yaml")
    assert result.errors == [], [str(e) for e in result.errors]
    return result.configs


def _proxy(ip: str, namespace: str, **labels: str) -> Proxy:
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": namespace, "LABELS": labels})
    node = base_pb2.Node(
        id=f"sidecar~{ip}~p.{namespace}~{namespace}.svc.cluster.local", metadata=meta
    )
    return Proxy.from_node(node)


PROXIES = [
    _proxy(ip, ns, **labels)
    for ip in (*ADDRESSES, "10.0.0.99")
    for ns in NAMESPACES
    for labels in ({}, {"app": "reviews", "version": "v2"})
]


def _endpoint_view(ctx: PushContext) -> dict[str, dict[int, tuple[Any, ...]]]:
    return {host: dict(per_port) for host, per_port in ctx.endpoints.items()}


def _instances(ctx: PushContext, proxy: Proxy) -> list[tuple[str, int, int]]:
    return [
        (i.service.hostname, i.port.port, i.endpoint_port) for i in ctx.service_instances(proxy)
    ]


def _load_assignments(ctx: PushContext) -> dict[str, bytes]:
    proxy = PROXIES[0]
    out = {}
    for svc in ctx.services_sorted:
        for port in svc.ports:
            for subset in ("", "v1", "v2"):
                name = naming.outbound_cluster_name(port.port, subset, svc.hostname)
                cla = eds.build_load_assignment(ctx, proxy, name)
                out[name] = cla.SerializeToString(deterministic=True)
    return out


def _assert_same(
    inc: PushContext, full: PushContext, prev_full: PushContext, *, pod_moved: bool = False
) -> None:
    assert _endpoint_view(inc) == _endpoint_view(full)
    changed = {h for h in full.endpoints if dict(full.endpoints[h]) != dict(prev_full.endpoints[h])}
    assert inc.changed_hosts == changed
    for proxy in PROXIES:
        assert _instances(inc, proxy) == _instances(full, proxy), proxy.id
    for svc in full.services_sorted:
        assert inc.service_identities(svc) == full.service_identities(svc), svc.hostname
    identities_moved = any(
        prev_full._cluster_identity(svc) != full._cluster_identity(svc)
        for svc in full.services_sorted
        if svc.hostname in changed
    )
    # A Pod whose labels, identity or IPs changed may change what its proxy gets.
    assert inc.requires_full_push == (identities_moved or pod_moved)
    assert _load_assignments(inc) == _load_assignments(full)


def _step(
    rng: random.Random, live: dict[ConfigKey, str], counter: list[int]
) -> tuple[list[str], list[ConfigKey]]:
    """Random WorkloadEntry changes (1-3 merged into one push): docs to apply, keys
    to delete."""
    applied: list[str] = []
    deleted: list[ConfigKey] = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        op = rng.random()
        if not live or op < 0.35:
            counter[0] += 1
            ns = rng.choice(NAMESPACES)
            key = ConfigKey("WorkloadEntry", ns, f"we-{counter[0]}")
            live[key] = doc = _entry(rng, key.name, ns)
            applied.append(doc)
        elif op < 0.5:
            key = rng.choice(sorted(live))
            del live[key]
            deleted.append(key)
        else:
            # Move, relabel or both: a fresh random body under the same name.
            key = rng.choice(sorted(live))
            live[key] = doc = _entry(rng, key.name, key.namespace)
            applied.append(doc)
    return applied, deleted


@pytest.mark.parametrize("seed", range(12))
def test_incremental_chain_equals_full_rebuild(seed: int) -> None:
    rng = random.Random(seed)
    store = ConfigStore()
    store.set_origin("services.yaml", _configs(SERVICES))
    live: dict[ConfigKey, str] = {}
    counter = [0]
    for _ in range(6):
        _step(rng, live, counter)
    for key, doc in live.items():
        store.apply(_configs(doc)[0], origin=f"we/{key.namespace}/{key.name}")
    inc = PushContext.build(store.snapshot(), MESH)
    prev_full = inc
    reporter = FindingsReporter()
    reporter.update(inc)
    for step in range(25):
        applied, deleted = _step(rng, live, counter)
        changed: set[ConfigKey] = set()
        for doc in applied:
            cfg = _configs(doc)[0]
            changed |= store.apply(cfg, origin=f"we/{cfg.namespace}/{cfg.name}")
        for key in deleted:
            changed |= store.remove_origin(f"we/{key.namespace}/{key.name}")
        before = _endpoint_view(inc)
        previous = inc
        snapshot = store.snapshot()
        if step % 3 == 0:
            # Readers touched the previous context's by-IP index: the new one
            # derives it; otherwise it builds its own on first use.
            _instances(previous, PROXIES[0])
        inc = previous.with_endpoint_changes(snapshot, frozenset(changed))
        full = PushContext.build(snapshot, MESH)
        _assert_same(inc, full, prev_full)
        # The previous context is left as it was, and shares all but endpoints.
        assert _endpoint_view(previous) == before
        assert inc.services is previous.services
        assert inc.destination_rules is previous.destination_rules
        assert inc.security is previous.security
        assert inc.virtual_services_all is previous.virtual_services_all
        assert inc.sidecar_scope(PROXIES[0]) is previous.sidecar_scope(PROXIES[0])
        # Analysis of the incremental chain finds what a fresh analysis finds.
        reporter.update(inc)
        assert reporter.messages == analyze(full), step
        prev_full = full


def test_endpoint_index_is_read_only() -> None:
    store = ConfigStore()
    store.set_origin("services.yaml", _configs(SERVICES))
    ctx = PushContext.build(store.snapshot(), MESH)
    changed = store.apply(_configs(_entry(random.Random(1), "we", "bookinfo"))[0])
    new = ctx.with_endpoint_changes(store.snapshot(), changed)
    assert isinstance(new.endpoints, MappingProxyType)
    with pytest.raises(TypeError):
        new.endpoints["x"] = {}  # type: ignore[index]
    for per_port in new.endpoints.values():
        assert isinstance(per_port, Mapping)
        with pytest.raises(TypeError):
            per_port[1] = ()  # type: ignore[index]


def test_unchanged_hosts_keep_their_endpoint_objects() -> None:
    # Readers (analysis) find what changed by identity: only changed hosts are new.
    store = ConfigStore()
    store.set_origin("services.yaml", _configs(SERVICES))
    entry = textwrap.dedent(
        """
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: r1, namespace: bookinfo}
        spec: {address: 10.0.0.5, labels: {app: ratings}}
        """
    )
    ctx = PushContext.build(store.snapshot(), MESH)
    changed = store.apply(_configs(entry)[0])
    new = ctx.with_endpoint_changes(store.snapshot(), changed)
    ratings = "ratings.bookinfo.svc.cluster.local"
    assert new.changed_hosts == {ratings}
    for host, per_port in new.endpoints.items():
        assert (per_port is ctx.endpoints[host]) == (host != ratings), host


def test_a_non_endpoint_change_rebuilds() -> None:
    # A caller that passes a Service change gets a full build, not a stale index.
    store = ConfigStore()
    store.set_origin("services.yaml", _configs(SERVICES))
    ctx = PushContext.build(store.snapshot(), MESH)
    extra = "apiVersion: v1\nkind: Service\nmetadata: {name: new, namespace: bookinfo}\n"
    extra += "spec: {selector: {app: new}, ports: [{name: http, port: 80}]}\n"
    changed = store.set_origin("extra.yaml", _configs(extra))
    new = ctx.with_endpoint_changes(store.snapshot(), changed)
    assert "new.bookinfo.svc.cluster.local" in new.services
    assert new.changed_hosts is None


# --- Kubernetes source: EndpointSlices, Pods, Nodes, Namespaces --------------------------

POD_NAMES = ("p", "pod-1", "pod-2", "pod-3")  # "p": the pod PROXIES' node ids name
NODES = ("n1", "n2", "n3")


def _kube_object(rng: random.Random, kind: str, namespace: str, name: str) -> dict[str, Any]:
    """A random API-server-shaped object of `kind`."""
    if kind == "Node":
        labels = {"topology.kubernetes.io/region": rng.choice(("us", "eu"))}
        if rng.random() < 0.7:
            labels["topology.kubernetes.io/zone"] = rng.choice(("a", "b"))
        return {"metadata": {"name": name, "labels": labels}}
    if kind == "Namespace":
        return {"metadata": {"name": name, "labels": {"team": rng.choice(("x", "y"))}}}
    if kind == "Pod":
        labels = {"app": rng.choice(APPS)}
        if rng.random() < 0.6:
            labels["version"] = rng.choice(VERSIONS)
        if rng.random() < 0.5:
            labels["security.istio.io/tlsMode"] = "istio"
        return {
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {
                "serviceAccountName": rng.choice(("reviews", "ratings", "")),
                "nodeName": rng.choice(NODES),
            },
            "status": {"podIPs": [{"ip": rng.choice(ADDRESSES)}]},
        }
    endpoints = []
    for _ in range(rng.choice((0, 1, 2, 3))):
        e: dict[str, Any] = {"addresses": [rng.choice(ADDRESSES)], "zone": "z"}
        if rng.random() < 0.8:
            e["targetRef"] = {"kind": "Pod", "namespace": namespace, "name": rng.choice(POD_NAMES)}
        if rng.random() < 0.4:
            e["conditions"] = {"ready": rng.random() < 0.5, "terminating": rng.random() < 0.5}
        if rng.random() < 0.3:
            e["nodeName"] = rng.choice(NODES)
        endpoints.append(e)
    ports = [
        {"name": "http", "port": rng.choice((8000, 8001))},
        {"name": "grpc", "port": 7070},
        {"name": "tcp", "port": 9000},
    ]
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": rng.choice((*APPS, "nosuch"))},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": rng.sample(ports, rng.choice((1, 2, 3))),
    }


def _kube_step(
    rng: random.Random, store: ConfigStore, live: set[ConfigKey]
) -> frozenset[ConfigKey]:
    """1-3 random Kubernetes object changes, applied to the store; the changed keys."""
    changed: set[ConfigKey] = set()
    for _ in range(rng.choice((1, 1, 2, 3))):
        kind = rng.choice(("EndpointSlice", "EndpointSlice", "Pod", "Pod", "Node", "Namespace"))
        if live and rng.random() < 0.2:
            key = rng.choice(sorted(live))
            live.discard(key)
            changed |= store.delete(key)
            continue
        ns = rng.choice(NAMESPACES) if kind in ("EndpointSlice", "Pod") else ""
        name = {
            "Pod": lambda: rng.choice(POD_NAMES),
            "Node": lambda: rng.choice(NODES),
            "Namespace": lambda: rng.choice(NAMESPACES),
            "EndpointSlice": lambda: f"slice-{rng.randrange(5)}",
        }[kind]()
        cfg = to_config(kind, _kube_object(rng, kind, ns, name), "Kubernetes")
        assert isinstance(cfg, Config), str(cfg)
        live.add(cfg.key)
        changed |= store.apply(cfg)
    return frozenset(changed)


def _pod_moved(prev: PushContext, new: PushContext, changed: frozenset[ConfigKey]) -> bool:
    def seen(ctx: PushContext, key: ConfigKey) -> Any:
        cfg = ctx.snapshot.get(key)
        if cfg is None:
            return None
        return (dict(cfg.labels), cfg.spec.service_account_name, cfg.spec.pod_ips)

    pods = [k for k in changed if k.kind == "Pod"]
    return any(seen(prev, k) != seen(new, k) for k in pods)


@pytest.mark.parametrize("seed", range(10))
def test_incremental_chain_with_kubernetes_objects_equals_full_rebuild(seed: int) -> None:
    rng = random.Random(1000 + seed)
    store = ConfigStore()
    store.set_origin("services.yaml", _configs(SERVICES))
    live: set[ConfigKey] = set()
    counter = [0]
    we_live: dict[ConfigKey, str] = {}
    for _ in range(8):
        _kube_step(rng, store, live)
    inc = PushContext.build(store.snapshot(), MESH)
    prev_full = inc
    for step in range(30):
        if rng.random() < 0.2:
            # WorkloadEntries selected by the same Services mix in.
            applied, deleted = _step(rng, we_live, counter)
            changed: frozenset[ConfigKey] = frozenset()
            for doc in applied:
                cfg = _configs(doc)[0]
                changed |= store.apply(cfg, origin=f"we/{cfg.namespace}/{cfg.name}")
            for key in deleted:
                changed |= store.remove_origin(f"we/{key.namespace}/{key.name}")
        else:
            changed = _kube_step(rng, store, live)
        assert not PushRequest.for_changes(changed).full
        previous = inc
        snapshot = store.snapshot()
        if step % 3 == 0:
            _instances(previous, PROXIES[0])
        inc = previous.with_endpoint_changes(snapshot, changed)
        full = PushContext.build(snapshot, MESH)
        _assert_same(inc, full, prev_full, pod_moved=_pod_moved(prev_full, full, changed))
        for proxy in PROXIES:
            assert inc.proxy_view(proxy) == full.proxy_view(proxy)
        assert inc.services is previous.services
        prev_full = full
