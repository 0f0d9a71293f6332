"""The Kubernetes source against the API server emulator: every kind into the store,
readiness, CRD version choice, validation errors, discoverySelectors and outages."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, config

from meshpilot.api import kube as kube_api
from meshpilot.api.networking import VirtualServiceSpec
from meshpilot.config import ConfigKey, kinds
from meshpilot.discovery.kube.source import KubeSource
from meshpilot.discovery.store import ConfigStore
from meshpilot.kube.backoff import Backoff
from tests.kube.apiserver import ApiServer
from tests.kube.helpers import NET, SEC, vs

SYSTEM = "istio-system"


def fast_backoff() -> Backoff:
    return Backoff(0.05, 0.3)


async def until(cond: Callable[[], bool]) -> None:
    """Wait (up to 10 s) for `cond`; changes arrive over real watches."""
    async with asyncio.timeout(10):
        while not cond():  # noqa: ASYNC110 - polls state the source's tasks change
            await asyncio.sleep(0.02)


def edit(
    server: ApiServer,
    where: tuple[str, str, str],
    ns: str,
    name: str,
    change: Callable[[dict[str, Any]], None],
) -> None:
    """Read-modify-write through the same rules as a PUT."""
    group, version, resource = where
    current = server.get(group, version, resource, ns, name)
    assert current is not None
    change(current)
    server.rest.update(server._rt(group, version, resource), version, ns, name, current, "")


def namespace(server: ApiServer, name: str, **labels: str) -> None:
    server.create("", "v1", "namespaces", {"metadata": {"name": name, "labels": labels}})


def service(server: ApiServer, ns: str, name: str = "web") -> None:
    server.create(
        "",
        "v1",
        "services",
        {
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80}]},
        },
    )


def mesh_configmap(server: ApiServer, mesh: str) -> None:
    server.create(
        "",
        "v1",
        "configmaps",
        {"metadata": {"name": "istio", "namespace": SYSTEM}, "data": {"mesh": mesh}},
    )


def set_mesh(server: ApiServer, mesh: str) -> None:
    edit(server, ("", "v1", "configmaps"), SYSTEM, "istio", lambda o: o.update(data={"mesh": mesh}))


def relabel(server: ApiServer, ns: str, **labels: str) -> None:
    def change(obj: dict[str, Any]) -> None:
        obj["metadata"]["labels"] = {"kubernetes.io/metadata.name": ns, **labels}

    edit(server, ("", "v1", "namespaces"), "", ns, change)


def keys(store: ConfigStore, kind: str) -> set[str]:
    return {f"{k.namespace}/{k.name}" for k in store.snapshot().of_kind(kind)}


@pytest.fixture
async def started() -> AsyncIterator[list[KubeSource]]:
    sources: list[KubeSource] = []
    yield sources
    for source in sources:
        await source.stop()


async def start_source(
    api: client.ApiClient, started: list[KubeSource], store: ConfigStore | None = None, **kw: Any
) -> tuple[KubeSource, ConfigStore]:
    store = store or ConfigStore()
    kw.setdefault("backoff", fast_backoff)
    source = KubeSource(store, api, "Kubernetes", SYSTEM, **kw)
    started.append(source)
    await source.start()
    return source, store


async def test_every_kind_enters_the_store(
    apiserver: ApiServer, api_client: client.ApiClient, started: list[KubeSource]
) -> None:
    namespace(apiserver, "shop", team="a")
    service(apiserver, "shop")
    apiserver.create(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        {
            "metadata": {
                "name": "web-abc",
                "namespace": "shop",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": ["10.0.0.5"],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "targetRef": {"kind": "Pod", "namespace": "shop", "name": "web-1"},
                    "zone": "zone-a",
                    "hints": {"forZones": [{"name": "zone-a"}]},
                }
            ],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP", "appProtocol": "http"}],
        },
    )
    apiserver.create(
        "",
        "v1",
        "pods",
        {
            "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
            "spec": {"serviceAccountName": "web", "nodeName": "n1", "containers": [{"name": "c"}]},
        },
    )
    apiserver.set_status(
        "",
        "v1",
        "pods",
        "shop",
        "web-1",
        {
            "phase": "Running",
            "podIP": "10.0.0.5",
            "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    )
    apiserver.create(
        "",
        "v1",
        "nodes",
        {
            "metadata": {
                "name": "n1",
                "labels": {
                    "topology.kubernetes.io/region": "r1",
                    "topology.kubernetes.io/zone": "zone-a",
                    "topology.istio.io/subzone": "rack-1",
                },
            }
        },
    )
    apiserver.create(
        NET,
        "v1",
        "virtualservices",
        {**vs("reviews"), "metadata": {"name": "reviews", "namespace": "shop"}},
    )
    apiserver.create(
        SEC,
        "v1",
        "peerauthentications",
        {
            "metadata": {"name": "default", "namespace": SYSTEM},
            "spec": {"mtls": {"mode": "STRICT"}},
        },
    )
    source, store = await start_source(api_client, started)
    await asyncio.wait_for(source.synced.wait(), 10)
    snap = store.snapshot()

    svc = snap.get(ConfigKey(kinds.SERVICE, "shop", "web"))
    assert svc is not None and isinstance(svc.spec, kube_api.KubeServiceSpec)
    assert svc.spec.ports[0].port == 80 and svc.origin == "Service shop/web (Kubernetes)"

    eps = snap.get(ConfigKey(kinds.ENDPOINT_SLICE, "shop", "web-abc"))
    assert eps is not None and isinstance(eps.spec, kube_api.EndpointSliceSpec)
    assert eps.labels["kubernetes.io/service-name"] == "web"
    endpoint = eps.spec.endpoints[0]
    assert endpoint.addresses == ["10.0.0.5"] and endpoint.conditions.ready is True
    assert endpoint.conditions.terminating is False and endpoint.zone == "zone-a"
    assert endpoint.target_ref is not None and endpoint.target_ref.name == "web-1"
    assert endpoint.hints is not None and endpoint.hints.for_zones[0].name == "zone-a"
    assert eps.spec.ports[0].app_protocol == "http" and eps.spec.ports[0].port == 8080
    assert kinds.ENDPOINT_SLICE in kinds.ENDPOINT_KINDS

    pod = snap.get(ConfigKey(kinds.POD, "shop", "web-1"))
    assert pod is not None and isinstance(pod.spec, kube_api.PodSpec)
    assert pod.spec.pod_ips == ["10.0.0.5", "fd00::5"] and pod.spec.ready
    assert pod.spec.service_account_name == "web" and pod.spec.node_name == "n1"
    assert pod.spec.phase == "Running" and pod.spec.deletion_timestamp == ""
    assert pod.labels == {"app": "web"}

    node = snap.get(ConfigKey(kinds.NODE, "", "n1"))
    assert node is not None and isinstance(node.spec, kube_api.NodeSpec)
    assert (node.spec.region, node.spec.zone, node.spec.subzone) == ("r1", "zone-a", "rack-1")

    ns = snap.get(ConfigKey(kinds.NAMESPACE, "", "shop"))
    assert ns is not None and ns.labels["team"] == "a"

    virtual = snap.get(ConfigKey(kinds.VIRTUAL_SERVICE, "shop", "reviews"))
    assert virtual is not None and isinstance(virtual.spec, VirtualServiceSpec)
    assert virtual.origin == "VirtualService shop/reviews (Kubernetes)"
    assert snap.get(ConfigKey(kinds.PEER_AUTHENTICATION, SYSTEM, "default")) is not None

    status = source.status()
    assert status["synced"] and status["connected"] and status["notServed"] == {}
    assert {i["resource"] for i in status["informers"]} >= {
        "services",
        "endpointslices.discovery.k8s.io",
        "pods",
        "nodes",
        "namespaces",
        "configmaps",
        "virtualservices.networking.istio.io",
        "authorizationpolicies.security.istio.io",
    }

    # Watch: an update and a delete reach the store.
    edit(
        apiserver,
        ("", "v1", "pods"),
        "shop",
        "web-1",
        lambda o: o["metadata"]["labels"].update(v="2"),
    )
    apiserver.delete(NET, "v1", "virtualservices", "shop", "reviews")
    await until(lambda: keys(store, kinds.VIRTUAL_SERVICE) == set())
    await until(
        lambda: store.snapshot().get(ConfigKey(kinds.POD, "shop", "web-1")).labels.get("v") == "2"
    )  # type: ignore[union-attr]


async def test_not_ready_until_listed_and_store_untouched_while_down(
    apiserver: ApiServer, api_client: client.ApiClient, started: list[KubeSource]
) -> None:
    service(apiserver, "default", "a")
    service(apiserver, "default", "b")
    await apiserver.stop()
    source, store = await start_source(api_client, started)
    await asyncio.sleep(1)
    assert not source.synced.is_set() and len(store.snapshot()) == 0
    await apiserver.start()
    await asyncio.wait_for(source.synced.wait(), 10)
    assert keys(store, kinds.SERVICE) == {"default/a", "default/b"}

    # Down for 3 s, with changes meanwhile: the store keeps the last known state.
    await apiserver.stop()
    apiserver.delete("", "v1", "services", "default", "a")
    service(apiserver, "default", "c")
    await asyncio.sleep(3)
    assert keys(store, kinds.SERVICE) == {"default/a", "default/b"}
    status = source.status()
    assert status["connected"] is False
    assert any(i["lastError"] for i in status["informers"])
    await apiserver.start()
    await until(lambda: keys(store, kinds.SERVICE) == {"default/b", "default/c"})
    await until(lambda: source.status()["connected"])


@pytest.fixture
async def beta_server(tmp_path: Path) -> AsyncIterator[tuple[ApiServer, client.ApiClient]]:
    # Networking served only at v1beta1; security.istio.io not served at all.
    server = ApiServer(served_versions={NET: ["v1beta1"], SEC: []}, bookmark_interval=0.2)
    await server.start()
    api = await config.new_client_from_config(
        config_file=str(server.write_kubeconfig(tmp_path / "kubeconfig"))
    )
    try:
        yield server, api
    finally:
        await api.close()
        await server.stop()


async def test_crd_version_from_discovery_and_kinds_not_served(
    beta_server: tuple[ApiServer, client.ApiClient], started: list[KubeSource]
) -> None:
    server, api = beta_server
    server.create(
        NET,
        "v1beta1",
        "virtualservices",
        {**vs("r", "v1beta1"), "metadata": {"name": "r", "namespace": "default"}},
    )
    source, store = await start_source(api, started)
    await asyncio.wait_for(source.synced.wait(), 10)
    informer = source.informer(kinds.VIRTUAL_SERVICE)
    assert informer is not None and informer.resource.version == "v1beta1"
    assert server.requests[("list", "virtualservices")] == 1
    assert keys(store, kinds.VIRTUAL_SERVICE) == {"default/r"}
    assert set(source.status()["notServed"]) == {
        kinds.PEER_AUTHENTICATION,
        kinds.AUTHORIZATION_POLICY,
    }
    assert source.informer(kinds.PEER_AUTHENTICATION) is None


async def test_invalid_crd_object_is_an_error_and_the_last_good_version_stays(
    apiserver: ApiServer, api_client: client.ApiClient, started: list[KubeSource]
) -> None:
    apiserver.create(
        NET, "v1", "virtualservices", {**vs("r"), "metadata": {"name": "r", "namespace": "default"}}
    )
    source, store = await start_source(api_client, started)
    await asyncio.wait_for(source.synced.wait(), 10)
    key = ConfigKey(kinds.VIRTUAL_SERVICE, "default", "r")
    good = store.snapshot().get(key)
    assert good is not None

    def break_it(obj: dict[str, Any]) -> None:
        obj["spec"]["http"][0]["route"][0]["weight"] = "heavy"

    edit(apiserver, (NET, "v1", "virtualservices"), "default", "r", break_it)
    await until(lambda: bool(store.errors()))
    [err] = store.errors()
    assert err.origin == "VirtualService default/r (Kubernetes)"
    assert (err.kind, err.namespace, err.name) == (kinds.VIRTUAL_SERVICE, "default", "r")
    assert err.field == "spec.http[0].route[0].weight"
    assert str(err).startswith("VirtualService default/r (Kubernetes)")
    assert store.snapshot().get(key) is good

    # Fixed: the error goes and the new version is in effect.
    edit(
        apiserver,
        (NET, "v1", "virtualservices"),
        "default",
        "r",
        lambda o: o["spec"]["http"][0]["route"][0].update(weight=100),
    )
    await until(lambda: not store.errors())
    assert store.snapshot().get(key) is not good


async def test_discovery_selectors_filter_namespaces_live(
    apiserver: ApiServer, api_client: client.ApiClient, started: list[KubeSource]
) -> None:
    namespace(apiserver, "prod", env="prod")
    namespace(apiserver, "dev", env="dev")
    for ns in ("prod", "dev", SYSTEM):
        service(apiserver, ns)
        apiserver.create(
            NET, "v1", "virtualservices", {**vs("r"), "metadata": {"name": "r", "namespace": ns}}
        )
    mesh_configmap(apiserver, "discoverySelectors:\n- matchLabels: {env: prod}\n")
    source, store = await start_source(api_client, started)
    heard: list[str] = []
    source.on_mesh_config(lambda mesh: heard.append(mesh.trust_domain))
    await asyncio.wait_for(source.synced.wait(), 10)
    # The system namespace is always in view, whatever the selectors say.
    assert keys(store, kinds.SERVICE) == {"prod/web", f"{SYSTEM}/web"}
    assert keys(store, kinds.VIRTUAL_SERVICE) == {"prod/r", f"{SYSTEM}/r"}
    assert "/dev" not in keys(store, kinds.NAMESPACE) and "/prod" in keys(store, kinds.NAMESPACE)

    relabel(apiserver, "dev", env="prod")
    await until(lambda: "dev/web" in keys(store, kinds.SERVICE))
    assert "dev/r" in keys(store, kinds.VIRTUAL_SERVICE)
    relabel(apiserver, "prod", env="retired")
    await until(lambda: "prod/web" not in keys(store, kinds.SERVICE))
    assert "prod/r" not in keys(store, kinds.VIRTUAL_SERVICE)
    assert "/prod" not in keys(store, kinds.NAMESPACE)

    # New selectors in the ConfigMap apply at once; matchExpressions too.
    set_mesh(
        apiserver,
        "discoverySelectors:\n- matchExpressions:\n"
        "  - {key: env, operator: In, values: [retired]}\n",
    )
    await until(lambda: keys(store, kinds.SERVICE) == {"prod/web", f"{SYSTEM}/web"})

    # An invalid mesh config is an error on the ConfigMap; the last good one stays.
    set_mesh(apiserver, "discoverySelectors:\n- matchExpressions:\n  - {key: env, operator: In}\n")
    await until(lambda: bool(source.mesh_errors))
    [err] = [e for e in store.errors() if e.kind == "ConfigMap"]
    assert err.origin == f"ConfigMap {SYSTEM}/istio (Kubernetes)"
    assert err.field == "data.mesh.discoverySelectors[0].matchExpressions[0].values"
    assert keys(store, kinds.SERVICE) == {"prod/web", f"{SYSTEM}/web"}

    # No selectors: every namespace.
    set_mesh(apiserver, "trustDomain: example.org\n")
    await until(lambda: keys(store, kinds.SERVICE) == {"prod/web", "dev/web", f"{SYSTEM}/web"})
    assert source.mesh_config.trust_domain == "example.org" and not store.errors()
    # Listeners hear MeshConfig changes only, not selector-only ones.
    assert heard == ["example.org"]


async def test_server_errors_at_start_are_retried(
    apiserver: ApiServer, api_client: client.ApiClient, started: list[KubeSource]
) -> None:
    service(apiserver, "default", "a")
    apiserver.fail_fraction(0.3, 500)
    source, store = await start_source(api_client, started)
    await asyncio.wait_for(source.synced.wait(), 20)
    apiserver.clear_faults()
    assert keys(store, kinds.SERVICE) == {"default/a"}
    assert sum(i["reconnects"] for i in source.status()["informers"]) > 0


async def test_a_mesh_config_that_expands_without_bound_is_refused(
    apiserver: ApiServer, api_client: client.ApiClient, started: list[KubeSource]
) -> None:
    # Nine levels of ten aliases each: a few hundred bytes that expand to 10^9 nodes.
    bomb = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10)
    )
    mesh_configmap(apiserver, bomb)
    source, store = await start_source(api_client, started)
    await asyncio.wait_for(source.synced.wait(), 10)
    [err] = store.errors()
    assert err.field == "data.mesh" and "expands to over" in err.message
    assert source.view.discovery_selectors is None


async def test_an_invalid_or_unreadable_object_is_its_own_error(
    apiserver: ApiServer, api_client: client.ApiClient, started: list[KubeSource]
) -> None:
    apiserver.create(
        "",
        "v1",
        "nodes",
        {"metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z"}}},
    )
    source, store = await start_source(api_client, started)
    await asyncio.wait_for(source.synced.wait(), 10)
    informer = source.informer(kinds.POD)
    assert informer is not None
    # An API server (or a proxy in front of it) sending a shape no model expects: the
    # object gets an error naming it; the informer and the source go on.
    apiserver.create(
        "",
        "v1",
        "pods",
        {
            "metadata": {"name": "odd", "namespace": "default"},
            "spec": {"containers": [{"name": "c"}]},
        },
    )
    apiserver.set_status("", "v1", "pods", "default", "odd", {"podIPs": [{"ip": 10}]})
    await until(lambda: bool(store.errors()))
    [err] = store.errors()
    assert err.origin == "Pod default/odd (Kubernetes)" and err.kind == kinds.POD
    assert err.field == "status.podIPs[0]"
    # Not a shape any field check expects: still this object's error, and nothing else's.
    apiserver.set_status("", "v1", "pods", "default", "odd", ["odd"])  # type: ignore[arg-type]
    await until(lambda: "unreadable object" in store.errors()[0].message)
    assert keys(store, kinds.NODE) == {"/n1"}
    service(apiserver, "default", "later")
    await until(lambda: "default/later" in keys(store, kinds.SERVICE))
