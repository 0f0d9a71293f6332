"""Istio custom resources on the API server emulator (every kind in every served version,
generation, /status, configurable served versions, CRDs) and TokenReview, driven through the
real kubernetes_asyncio client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kube.apiserver import ApiServer
from tests.kube.helpers import NET, SEC, status_of, vs


@pytest.mark.parametrize(
    ("group", "plural", "kind"),
    [
        (NET, "virtualservices", "VirtualService"),
        (NET, "destinationrules", "DestinationRule"),
        (NET, "gateways", "Gateway"),
        (NET, "serviceentries", "ServiceEntry"),
        (NET, "workloadentries", "WorkloadEntry"),
        (NET, "sidecars", "Sidecar"),
        (SEC, "peerauthentications", "PeerAuthentication"),
        (SEC, "authorizationpolicies", "AuthorizationPolicy"),
        (SEC, "requestauthentications", "RequestAuthentication"),
    ],
)
async def test_istio_custom_resources_in_every_served_version(
    api_client: client.ApiClient, group: str, plural: str, kind: str
) -> None:
    crd = client.CustomObjectsApi(api_client)
    versions = ["v1", "v1beta1", "v1alpha3"] if group == NET else ["v1", "v1beta1"]
    body = {
        "apiVersion": f"{group}/{versions[-1]}",
        "kind": kind,
        "metadata": {"name": "one"},
        "spec": {},
    }
    created = await crd.create_namespaced_custom_object(
        group, versions[-1], "default", plural, body
    )
    assert created["metadata"]["generation"] == 1
    for version in versions:
        got = await crd.get_namespaced_custom_object(group, version, "default", plural, "one")
        assert got["apiVersion"] == f"{group}/{version}" and got["kind"] == kind
        assert got["metadata"]["uid"] == created["metadata"]["uid"]
        listed = await crd.list_namespaced_custom_object(group, version, "default", plural)
        assert [i["apiVersion"] for i in listed["items"]] == [f"{group}/{version}"]
    deleted = await crd.delete_namespaced_custom_object(
        group, versions[0], "default", plural, "one"
    )
    assert deleted["kind"] == "Status" and deleted["status"] == "Success"
    with pytest.raises(ApiException) as caught:
        await crd.get_namespaced_custom_object(group, versions[0], "default", plural, "one")
    assert status_of(caught.value)["message"] == f'{plural}.{group} "one" not found'


async def test_custom_resource_generation_status_and_update_rules(
    api_client: client.ApiClient,
) -> None:
    crd = client.CustomObjectsApi(api_client)
    created = await crd.create_namespaced_custom_object(
        NET, "v1", "default", "virtualservices", {**vs("r"), "status": {"x": 1}}
    )
    assert "status" not in created
    created["metadata"]["labels"] = {"team": "a"}
    relabelled = await crd.replace_namespaced_custom_object(
        NET, "v1", "default", "virtualservices", "r", created
    )
    assert relabelled["metadata"]["generation"] == 1  # metadata changes keep the generation
    relabelled["spec"]["hosts"] = ["ratings"]
    relabelled["status"] = {"ignored": True}
    respec = await crd.replace_namespaced_custom_object(
        NET, "v1", "default", "virtualservices", "r", relabelled
    )
    assert respec["metadata"]["generation"] == 2 and "status" not in respec
    status = await crd.patch_namespaced_custom_object_status(
        NET,
        "v1",
        "default",
        "virtualservices",
        "r",
        {"status": {"observedGeneration": 2}},
        _content_type="application/merge-patch+json",
    )
    assert status["status"] == {"observedGeneration": 2}
    assert status["metadata"]["generation"] == 2
    # Custom resources need resourceVersion on update.
    del status["metadata"]["resourceVersion"]
    with pytest.raises(ApiException) as caught:
        await crd.replace_namespaced_custom_object(
            NET, "v1", "default", "virtualservices", "r", status
        )
    assert caught.value.status == 422
    # Strategic merge patch is not accepted for custom resources.
    with pytest.raises(ApiException) as caught:
        await crd.patch_namespaced_custom_object(
            NET,
            "v1",
            "default",
            "virtualservices",
            "r",
            {"spec": {}},
            _content_type="application/strategic-merge-patch+json",
        )
    assert caught.value.status == 415
    with pytest.raises(ApiException) as caught:
        await crd.create_namespaced_custom_object(
            NET, "v1", "default", "virtualservices", vs("wrong", version="v1beta1")
        )
    assert caught.value.status == 400


async def test_served_versions_are_configurable(tmp_path: Path) -> None:
    async with ApiServer(served_versions={NET: ["v1beta1"], SEC: ["v1beta1"]}) as server:
        api = await config.new_client_from_config(
            config_file=str(server.write_kubeconfig(tmp_path / "kc"))
        )
        try:
            crd = client.CustomObjectsApi(api)
            groups = await client.ApisApi(api).get_api_versions()
            net = next(g for g in groups.groups if g.name == NET)
            assert [v.version for v in net.versions] == ["v1beta1"]
            assert net.preferred_version.version == "v1beta1"
            with pytest.raises(ApiException) as caught:
                await crd.list_namespaced_custom_object(NET, "v1", "default", "virtualservices")
            assert caught.value.status == 404
            assert status_of(caught.value)["message"] == (
                "the server could not find the requested resource"
            )
            await crd.create_namespaced_custom_object(
                NET, "v1beta1", "default", "virtualservices", vs("r", "v1beta1")
            )
            listed = await crd.list_cluster_custom_object(NET, "v1beta1", "virtualservices")
            assert [i["metadata"]["name"] for i in listed["items"]] == ["r"]
            crds = await client.ApiextensionsV1Api(api).read_custom_resource_definition(
                f"virtualservices.{NET}"
            )
            assert [(v.name, v.served) for v in crds.spec.versions] == [("v1beta1", True)]
            assert crds.status.stored_versions == ["v1beta1"]
            established = {c.type: c.status for c in crds.status.conditions}
            assert established["Established"] == "True"
        finally:
            await api.close()


async def test_token_review(apiserver: ApiServer, api_client: client.ApiClient) -> None:
    auth = client.AuthenticationV1Api(api_client)
    token = apiserver.add_service_account_token("bookinfo", "reviews", ["istio-ca"])

    async def review(token: str, audiences: list[str] | None = None) -> Any:
        body = {"spec": {"token": token, "audiences": audiences}}
        return (await auth.create_token_review(body)).status

    ok = await review(token, ["istio-ca", "other"])
    assert ok.authenticated is True
    assert ok.user.username == "system:serviceaccount:bookinfo:reviews"
    assert "system:serviceaccounts:bookinfo" in ok.user.groups
    assert ok.audiences == ["istio-ca"]
    wrong_audience = await review(token, ["somewhere-else"])
    assert not wrong_audience.authenticated and "audiences" in wrong_audience.error
    unknown = await review("not-a-token", ["istio-ca"])
    assert not unknown.authenticated and unknown.error
    apiserver.revoke_token(token)
    assert not (await review(token, ["istio-ca"])).authenticated
    with pytest.raises(ApiException) as caught:
        await auth.create_token_review({"spec": {}})
    assert caught.value.status == 400


async def test_service_account_tokens_authenticate_to_the_api_for_its_audience(
    apiserver: ApiServer,
) -> None:
    for audiences, expected in (((), 200), (["istio-ca"], 401)):
        kc = apiserver.kubeconfig()
        token = apiserver.add_service_account_token("istio-system", "istiod", audiences)
        kc["users"] = [{"name": "emulator", "user": {"token": token}}]
        api = await config.new_client_from_config_dict(kc)
        try:
            try:
                await client.CoreV1Api(api).list_namespace()
                status = 200
            except ApiException as exc:
                status = exc.status
        finally:
            await api.close()
        assert status == expected, audiences
