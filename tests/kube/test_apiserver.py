"""The API server emulator, driven only through the real kubernetes_asyncio client: discovery,
authentication, CRUD on built-in kinds, pagination, selectors and the strictness a real server
shows. Istio custom resources and TokenReview are in test_apiserver_custom.py, watches and
fault injection in test_apiserver_watch.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kube.apiserver import ApiServer
from tests.kube.helpers import NET, SEC, cm, status_of


async def test_discovery_lists_groups_versions_and_resources(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = await client.CoreApi(api_client).get_api_versions()
    assert core.versions == ["v1"]
    resources = await client.CoreV1Api(api_client).get_api_resources()
    by_name = {r.name: r for r in resources.resources}
    assert by_name["services"].kind == "Service" and by_name["services"].namespaced
    assert not by_name["nodes"].namespaced and "watch" in by_name["pods"].verbs
    assert by_name["services/status"].verbs == ["get", "patch", "update"]
    groups = {g.name: g for g in (await client.ApisApi(api_client).get_api_versions()).groups}
    assert groups[NET].preferred_version.group_version == f"{NET}/v1"
    assert [v.version for v in groups[NET].versions] == ["v1", "v1beta1", "v1alpha3"]
    assert [v.version for v in groups[SEC].versions] == ["v1", "v1beta1"]
    assert groups["coordination.k8s.io"].preferred_version.version == "v1"
    slices = await client.DiscoveryV1Api(api_client).get_api_resources()
    assert [r.kind for r in slices.resources] == ["EndpointSlice"]
    review = await client.AuthenticationV1Api(api_client).get_api_resources()
    assert review.resources[0].verbs == ["create"]
    crds = await client.ApiextensionsV1Api(api_client).list_custom_resource_definition()
    assert len(crds.items) == 9
    assert {c.spec.names.kind for c in crds.items} >= {"VirtualService", "PeerAuthentication"}
    with pytest.raises(ApiException) as caught:
        await client.ApiextensionsV1Api(api_client).delete_custom_resource_definition(
            f"virtualservices.{NET}"
        )
    assert caught.value.status == 405


async def test_load_kube_config_sets_up_the_default_client(
    apiserver: ApiServer, kubeconfig: Path
) -> None:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    assert configuration.host == apiserver.url
    async with client.ApiClient(configuration) as api:
        namespaces = await client.CoreV1Api(api).list_namespace()
    names = {n.metadata.name for n in namespaces.items}
    assert {"default", "kube-system", "istio-system"} <= names
    default = next(n for n in namespaces.items if n.metadata.name == "default")
    assert default.metadata.labels == {"kubernetes.io/metadata.name": "default"}
    assert default.status.phase == "Active"


async def test_requests_without_a_valid_token_get_401(apiserver: ApiServer, tmp_path: Path) -> None:
    kc = apiserver.kubeconfig()
    kc["users"] = [{"name": "emulator", "user": {"token": "wrong"}}]
    api = await config.new_client_from_config_dict(kc)
    try:
        with pytest.raises(ApiException) as caught:
            await client.CoreV1Api(api).list_namespace()
    finally:
        await api.close()
    assert caught.value.status == 401
    assert status_of(caught.value)["reason"] == "Unauthorized"
    # Unknown paths too: nothing is revealed before authentication.
    api = await config.new_client_from_config_dict(kc)
    try:
        with pytest.raises(ApiException) as caught:
            await client.CustomObjectsApi(api).list_cluster_custom_object("x.io", "v1", "things")
    finally:
        await api.close()
    assert caught.value.status == 401


async def test_configmap_create_get_list_update_patch_delete(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    created = await core.create_namespaced_config_map("default", cm("mesh", {"app": "x"}, a="1"))
    meta = created.metadata
    assert meta.uid and meta.creation_timestamp and int(meta.resource_version) > 0
    assert meta.generation is None  # ConfigMaps carry no generation on a real server either
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_config_map("default", cm("mesh"))
    assert caught.value.status == 409 and status_of(caught.value)["reason"] == "AlreadyExists"

    got = await core.read_namespaced_config_map("mesh", "default")
    assert got.data == {"a": "1"} and got.metadata.uid == meta.uid
    got.data["b"] = "2"
    updated = await core.replace_namespaced_config_map("mesh", "default", got)
    assert int(updated.metadata.resource_version) > int(meta.resource_version)

    patched = await core.patch_namespaced_config_map(
        "mesh",
        "default",
        {"data": {"a": None, "c": "3"}},
        _content_type="application/merge-patch+json",
    )
    assert patched.data == {"b": "2", "c": "3"}
    patched = await core.patch_namespaced_config_map(
        "mesh", "default", [{"op": "replace", "path": "/data/b", "value": "two"}]
    )
    assert patched.data == {"b": "two", "c": "3"}

    listed = await core.list_namespaced_config_map("default")
    assert [i.metadata.name for i in listed.items] == ["mesh"]
    assert listed.metadata.resource_version == patched.metadata.resource_version
    everywhere = await core.list_config_map_for_all_namespaces()
    assert [i.metadata.namespace for i in everywhere.items] == ["default"]

    gone = await core.delete_namespaced_config_map("mesh", "default")
    assert gone.status == "Success" and gone.details.uid == meta.uid
    with pytest.raises(ApiException) as caught:
        await core.read_namespaced_config_map("mesh", "default")
    body = status_of(caught.value)
    assert caught.value.status == 404 and body["reason"] == "NotFound"
    assert body["message"] == 'configmaps "mesh" not found'


async def test_update_rules_follow_each_kinds_strategy(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    leases = client.CoordinationV1Api(api_client)
    first = await core.create_namespaced_config_map("default", cm("c", a="1"))
    # ConfigMaps accept an update without resourceVersion (unconditional) ...
    unconditional = cm("c", a="2")
    out = await core.replace_namespaced_config_map("c", "default", unconditional)
    assert out.data == {"a": "2"}
    # ... but a stale one is a conflict.
    stale = cm("c", a="3")
    stale["metadata"]["resourceVersion"] = first.metadata.resource_version
    with pytest.raises(ApiException) as caught:
        await core.replace_namespaced_config_map("c", "default", stale)
    assert caught.value.status == 409 and status_of(caught.value)["reason"] == "Conflict"

    lease = {"metadata": {"name": "istiod"}, "spec": {"holderIdentity": "a"}}
    await leases.create_namespaced_lease("istio-system", lease)
    with pytest.raises(ApiException) as caught:
        await leases.replace_namespaced_lease("istiod", "istio-system", lease)
    body = status_of(caught.value)
    assert caught.value.status == 422 and body["reason"] == "Invalid"
    assert body["details"]["causes"][0]["field"] == "metadata.resourceVersion"

    # A write that changes nothing keeps the revision.
    current = await core.read_namespaced_config_map("c", "default")
    again = await core.replace_namespaced_config_map("c", "default", current)
    assert again.metadata.resource_version == current.metadata.resource_version


async def test_lease_leader_election_race_has_one_winner(api_client: client.ApiClient) -> None:
    leases = client.CoordinationV1Api(api_client)
    spec = {"holderIdentity": "", "leaseDurationSeconds": 15}
    # Leases may be created with PUT.
    created = await leases.replace_namespaced_lease(
        "istio-leader", "istio-system", {"metadata": {"name": "istio-leader"}, "spec": spec}
    )
    assert created.spec.lease_duration_seconds == 15
    a = await leases.read_namespaced_lease("istio-leader", "istio-system")
    b = await leases.read_namespaced_lease("istio-leader", "istio-system")
    a.spec.holder_identity = "istiod-a"
    b.spec.holder_identity = "istiod-b"
    won = await leases.replace_namespaced_lease("istio-leader", "istio-system", a)
    assert won.spec.holder_identity == "istiod-a"
    with pytest.raises(ApiException) as caught:
        await leases.replace_namespaced_lease("istio-leader", "istio-system", b)
    assert caught.value.status == 409
    assert "the object has been modified" in status_of(caught.value)["message"]
    held = await leases.read_namespaced_lease("istio-leader", "istio-system")
    assert held.spec.holder_identity == "istiod-a"


async def test_services_pods_secrets_get_server_side_defaults(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    svc = await core.create_namespaced_service(
        "default",
        {"metadata": {"name": "reviews"}, "spec": {"ports": [{"port": 9080, "name": "http"}]}},
    )
    assert svc.spec.type == "ClusterIP" and svc.spec.cluster_ip
    assert svc.spec.cluster_ips == [svc.spec.cluster_ip]
    assert svc.spec.ports[0].protocol == "TCP" and svc.spec.ports[0].target_port == 9080
    svc.spec.cluster_ip = "10.0.0.1"
    svc.spec.cluster_ips = ["10.0.0.1"]
    with pytest.raises(ApiException) as caught:
        await core.replace_namespaced_service("reviews", "default", svc)
    assert caught.value.status == 422
    # A Service delete answers with the Service, a ConfigMap delete with a Status.
    deleted = await core.delete_namespaced_service("reviews", "default")
    assert deleted.kind == "Service" and deleted.metadata.name == "reviews"

    pod = await core.create_namespaced_pod(
        "default",
        {
            "metadata": {"name": "reviews-1", "labels": {"app": "reviews"}},
            "spec": {"containers": [{"name": "app", "image": "reviews"}]},
            "status": {"podIP": "10.1.0.5"},
        },
    )
    # A client cannot set status on create; a kubelet writes it through /status.
    assert pod.status.phase == "Pending" and pod.status.pod_ip is None
    pod.status.pod_ip = "10.1.0.5"
    pod.status.phase = "Running"
    written = await core.replace_namespaced_pod_status("reviews-1", "default", pod)
    assert written.status.pod_ip == "10.1.0.5"
    apiserver.set_status("", "v1", "pods", "default", "reviews-1", {"phase": "Succeeded"})
    assert (await core.read_namespaced_pod("reviews-1", "default")).status.phase == "Succeeded"

    secret = await core.create_namespaced_secret(
        "istio-system", {"metadata": {"name": "cacerts"}, "stringData": {"ca.crt": "pem"}}
    )
    assert secret.type == "Opaque" and secret.data == {"ca.crt": "cGVt"}
    assert secret.string_data is None
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_secret(
            "istio-system", {"metadata": {"name": "bad"}, "data": {"k": "not base64!"}}
        )
    assert caught.value.status == 400


async def test_namespaces_scope_objects(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_config_map("nowhere", cm("x"))
    assert caught.value.status == 404
    assert status_of(caught.value)["message"] == 'namespaces "nowhere" not found'
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_config_map(
            "default", {"metadata": {"name": "x", "namespace": "other"}}
        )
    assert caught.value.status == 400
    await core.create_namespace({"metadata": {"name": "bookinfo"}})
    await core.create_namespaced_config_map("bookinfo", cm("x"))
    await core.create_namespaced_service_account("bookinfo", {"metadata": {"name": "reviews"}})
    await core.delete_namespace("bookinfo")
    assert (await core.list_config_map_for_all_namespaces()).items == []
    assert (await core.list_service_account_for_all_namespaces()).items == []


async def test_endpointslices(api_client: client.ApiClient) -> None:
    disc = client.DiscoveryV1Api(api_client)
    body = {
        "metadata": {"name": "reviews-abc", "labels": {"kubernetes.io/service-name": "reviews"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.1.0.5"], "conditions": {"ready": True}}],
        "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
    }
    created = await disc.create_namespaced_endpoint_slice("default", body)
    assert created.endpoints[0].addresses == ["10.1.0.5"]
    assert created.metadata.generation == 1
    created.metadata.labels["extra"] = "x"
    relabelled = await disc.replace_namespaced_endpoint_slice("reviews-abc", "default", created)
    assert relabelled.metadata.generation == 2
    listed = await disc.list_endpoint_slice_for_all_namespaces(
        label_selector="kubernetes.io/service-name=reviews"
    )
    assert [s.metadata.name for s in listed.items] == ["reviews-abc"]
    with pytest.raises(ApiException) as caught:
        await disc.create_namespaced_endpoint_slice(
            "default", {"metadata": {"name": "x"}, "endpoints": []}
        )
    assert caught.value.status == 422


async def test_pagination_is_a_consistent_snapshot(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    for i in range(5):
        await core.create_namespaced_config_map("default", cm(f"c{i}"))
    first = await core.list_namespaced_config_map("default", limit=2)
    assert [i.metadata.name for i in first.items] == ["c0", "c1"]
    assert first.metadata.remaining_item_count == 3 and first.metadata._continue
    # Changes after the first page do not show in later pages.
    await core.create_namespaced_config_map("default", cm("c2a"))
    await core.delete_namespaced_config_map("c4", "default")
    names: list[str] = []
    token = first.metadata._continue
    while token:
        page = await core.list_namespaced_config_map("default", limit=2, _continue=token)
        assert page.metadata.resource_version == first.metadata.resource_version
        names += [i.metadata.name for i in page.items]
        token = page.metadata._continue
    assert names == ["c2", "c3", "c4"]
    # A continue token from before a compaction has expired.
    again = await core.list_namespaced_config_map("default", limit=1)
    await core.create_namespaced_config_map("default", cm("later"))
    apiserver.compact()
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_config_map(
            "default", limit=1, _continue=again.metadata._continue
        )
    assert caught.value.status == 410 and status_of(caught.value)["reason"] == "Expired"
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_config_map("default", _continue="garbage")
    assert caught.value.status == 400


async def test_list_resource_version_semantics(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    before = await core.create_namespaced_config_map("default", cm("a"))
    await core.create_namespaced_config_map("default", cm("b"))
    # resourceVersion=0 is served whole from the cache, limit or not.
    whole = await core.list_namespaced_config_map("default", resource_version="0", limit=1)
    assert len(whole.items) == 2 and not whole.metadata._continue
    exact = await core.list_namespaced_config_map(
        "default",
        resource_version=before.metadata.resource_version,
        resource_version_match="Exact",
    )
    assert [i.metadata.name for i in exact.items] == ["a"]
    fresh = await core.list_namespaced_config_map(
        "default", resource_version=before.metadata.resource_version
    )
    assert len(fresh.items) == 2
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_config_map("default", resource_version="999999")
    body = status_of(caught.value)
    assert caught.value.status == 504
    assert body["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"
    apiserver.compact()
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_config_map(
            "default",
            resource_version=before.metadata.resource_version,
            resource_version_match="Exact",
        )
    assert caught.value.status == 410
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_config_map("default", resource_version_match="NotOlderThan")
    assert caught.value.status == 422
    assert status_of(caught.value)["details"]["kind"] == "ListOptions"


async def test_label_selectors(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_config_map("default", cm("a", {"app": "web", "tier": "1"}))
    await core.create_namespaced_config_map("default", cm("b", {"app": "db", "tier": "2"}))
    await core.create_namespaced_config_map("default", cm("c", {"tier": "3"}))

    async def names(selector: str) -> list[str]:
        out = await core.list_namespaced_config_map("default", label_selector=selector)
        return [i.metadata.name for i in out.items]

    assert await names("app=web") == ["a"]
    assert await names("app==db") == ["b"]
    assert await names("app!=web") == ["b", "c"]
    assert await names("app in (web, db)") == ["a", "b"]
    assert await names("app notin (web)") == ["b", "c"]
    assert await names("app") == ["a", "b"]
    assert await names("!app") == ["c"]
    assert await names("app,tier=2") == ["b"]
    assert await names("tier>1") == ["b", "c"]
    with pytest.raises(ApiException) as caught:
        await names("app in (web")
    assert caught.value.status == 400 and status_of(caught.value)["reason"] == "BadRequest"


async def test_field_selectors(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_config_map("default", cm("a"))
    await core.create_namespaced_config_map("istio-system", cm("a"))
    await core.create_namespaced_config_map("istio-system", cm("b"))
    everywhere = await core.list_config_map_for_all_namespaces(
        field_selector="metadata.name=a,metadata.namespace!=default"
    )
    assert [(i.metadata.namespace, i.metadata.name) for i in everywhere.items] == [
        ("istio-system", "a")
    ]
    with pytest.raises(ApiException) as caught:
        await core.list_config_map_for_all_namespaces(field_selector="data.x=1")
    assert caught.value.status == 400
    assert "field label not supported" in status_of(caught.value)["message"]
    crd = client.CustomObjectsApi(api_client)
    with pytest.raises(ApiException) as caught:
        await crd.list_cluster_custom_object(
            NET, "v1", "virtualservices", field_selector="spec.hosts=x"
        )
    assert caught.value.status == 400


async def test_strictness_on_parameters_bodies_and_paths(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    with pytest.raises(ApiException) as caught:
        await core.list_namespaced_config_map("default", limit="abc")
    assert caught.value.status == 400
    # Unknown parameters are ignored, as on a real server.
    await core.list_namespaced_config_map("default", pretty="true")
    with pytest.raises(ApiException) as caught:
        await api_client.call_api(
            "/api/v1/namespaces/default/configmaps",
            "POST",
            header_params={"Content-Type": "text/plain"},
            body=json.dumps(cm("x")).encode(),
            auth_settings=["BearerToken"],
            response_types_map={201: "V1ConfigMap"},
        )
    assert caught.value.status == 415
    assert status_of(caught.value)["reason"] == "UnsupportedMediaType"
    await core.create_namespaced_config_map("default", cm("x"))
    # kubernetes_asyncio sends dict patches as strategic merge patch unless told otherwise.
    with pytest.raises(ApiException) as caught:
        await core.patch_namespaced_config_map("x", "default", {"data": {"a": "b"}})
    assert caught.value.status == 415
    with pytest.raises(ApiException) as caught:
        await client.CustomObjectsApi(api_client).list_cluster_custom_object(NET, "v1", "widgets")
    assert caught.value.status == 404 and status_of(caught.value)["reason"] == "NotFound"
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_config_map("default", cm("Not_A_Name"))
    assert caught.value.status == 422
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_config_map("default", {"metadata": {}})
    assert caught.value.status == 422
    with pytest.raises(ApiException) as caught:
        await core.create_namespaced_config_map("default", cm("big", blob="x" * (4 << 20)))
    assert caught.value.status == 413
    assert status_of(caught.value)["reason"] == "RequestEntityTooLarge"
    generated = await core.create_namespaced_config_map(
        "default", {"metadata": {"generateName": "gen-"}}
    )
    assert generated.metadata.name.startswith("gen-") and len(generated.metadata.name) > 4


async def test_delete_preconditions_and_collections(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    for name, app in (("a", "x"), ("b", "x"), ("c", "y")):
        await core.create_namespaced_config_map("default", cm(name, {"app": app}))
    with pytest.raises(ApiException) as caught:
        await core.delete_namespaced_config_map(
            "a", "default", body={"preconditions": {"resourceVersion": "1"}}
        )
    assert caught.value.status == 409
    await core.delete_collection_namespaced_config_map("default", label_selector="app=x")
    left = await core.list_namespaced_config_map("default")
    assert [i.metadata.name for i in left.items] == ["c"]
    dry = await core.delete_namespaced_config_map("c", "default", dry_run="All")
    assert dry.status == "Success"
    assert (await core.read_namespaced_config_map("c", "default")).metadata.name == "c"
