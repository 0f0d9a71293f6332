"""Watches and fault injection on the API server emulator, driven through the real
kubernetes_asyncio client and its `watch.Watch().stream(...)`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kube.apiserver import ApiServer
from tests.kube.helpers import MERGE, cm

REPO = Path(__file__).resolve().parents[2]
Events = list[tuple[str, str]]


async def collect(
    func: Callable[..., Any], *args: Any, count: int, **kwargs: Any
) -> list[dict[str, Any]]:
    """The first `count` events of a watch (fewer if the stream ends first)."""
    out: list[dict[str, Any]] = []
    async with watch.Watch() as w:
        async for event in w.stream(func, *args, **kwargs):
            out.append(event)
            if len(out) == count:
                break
    return out


async def _wait_for_watchers(apiserver: ApiServer, count: int) -> None:
    await apiserver.store.wait_for_watchers(count, timeout=5)


def names(events: list[dict[str, Any]]) -> Events:
    return [(e["type"], e["raw_object"]["metadata"].get("name", "")) for e in events]


async def test_watch_sends_added_modified_deleted_from_a_resource_version(
    api_client: client.ApiClient,
) -> None:
    core = client.CoreV1Api(api_client)
    rv = (await core.list_namespaced_config_map("default")).metadata.resource_version
    task = asyncio.create_task(
        collect(
            core.list_namespaced_config_map,
            "default",
            count=3,
            resource_version=rv,
            timeout_seconds=10,
        )
    )
    created = await core.create_namespaced_config_map("default", cm("a"))
    patched = await core.patch_namespaced_config_map(
        "a", "default", {"data": {"k": "v"}}, _content_type=MERGE
    )
    await core.delete_namespaced_config_map("a", "default")
    events = await asyncio.wait_for(task, 10)
    assert names(events) == [("ADDED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert events[0]["object"].metadata.resource_version == created.metadata.resource_version
    assert events[1]["object"].data == {"k": "v"}
    deleted_rv = int(events[2]["object"].metadata.resource_version)
    assert deleted_rv > int(patched.metadata.resource_version)
    assert events[2]["raw_object"]["kind"] == "ConfigMap"


async def test_watch_without_resource_version_starts_with_the_current_state(
    api_client: client.ApiClient,
) -> None:
    core = client.CoreV1Api(api_client)
    await core.create_namespaced_config_map("default", cm("b"))
    await core.create_namespaced_config_map("istio-system", cm("a"))
    events = await collect(core.list_config_map_for_all_namespaces, count=2, timeout_seconds=10)
    assert names(events) == [("ADDED", "b"), ("ADDED", "a")]  # key order: default/ < istio-system/


async def test_watch_applies_selectors_to_changes(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    rv = (await core.list_namespaced_config_map("default")).metadata.resource_version
    task = asyncio.create_task(
        collect(
            core.list_namespaced_config_map,
            "default",
            count=4,
            resource_version=rv,
            label_selector="app=web",
            timeout_seconds=10,
        )
    )
    await core.create_namespaced_config_map("default", cm("other", {"app": "db"}))
    await core.create_namespaced_config_map("default", cm("w", {"app": "web"}))
    relabel = await core.patch_namespaced_config_map(
        "w", "default", {"metadata": {"labels": {"app": "db"}}}, _content_type=MERGE
    )
    await core.patch_namespaced_config_map(
        "w", "default", {"metadata": {"labels": {"app": "web"}}}, _content_type=MERGE
    )
    await core.delete_namespaced_config_map("w", "default")
    events = await asyncio.wait_for(task, 10)
    assert names(events) == [("ADDED", "w"), ("DELETED", "w"), ("ADDED", "w"), ("DELETED", "w")]
    # Leaving the selection is sent as DELETED with the last matching state at the new revision.
    left = events[1]["raw_object"]["metadata"]
    assert left["labels"] == {"app": "web"}
    assert left["resourceVersion"] == relabel.metadata.resource_version


async def test_custom_resource_watch_renders_the_watched_version(
    api_client: client.ApiClient,
) -> None:
    crd = client.CustomObjectsApi(api_client)
    body = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "default"},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    await crd.create_namespaced_custom_object(
        "security.istio.io", "v1", "istio-system", "peerauthentications", body
    )
    events = await collect(
        crd.list_namespaced_custom_object,
        "security.istio.io",
        "v1beta1",
        "istio-system",
        "peerauthentications",
        count=1,
        timeout_seconds=10,
    )
    assert events[0]["type"] == "ADDED"
    assert events[0]["object"]["apiVersion"] == "security.istio.io/v1beta1"


async def test_watch_bookmarks_carry_only_the_resource_version(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    created = await core.create_namespaced_config_map("default", cm("a"))
    apiserver.bookmark_interval = 60.0  # only the bookmark asked for below
    async with watch.Watch() as w:
        stream = w.stream(
            core.list_namespaced_config_map,
            "default",
            resource_version=created.metadata.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=10,
        )
        task = asyncio.create_task(anext(stream))
        await _wait_for_watchers(apiserver, 1)
        # Another resource's write moves the revision a bookmark reports.
        await core.create_namespaced_service_account("default", {"metadata": {"name": "sa"}})
        apiserver.send_bookmarks()
        event = await asyncio.wait_for(task, 5)
        assert event["type"] == "BOOKMARK"
        assert event["raw_object"] == {
            "kind": "ConfigMap",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(apiserver.store.rv)},
        }
        assert int(apiserver.store.rv) > int(created.metadata.resource_version)
        assert w.resource_version == str(apiserver.store.rv)


async def test_bookmarks_are_periodic_when_allowed(api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    rv = (await core.list_namespaced_config_map("default")).metadata.resource_version
    allowed = await collect(
        core.list_namespaced_config_map,
        "default",
        count=2,
        resource_version=rv,
        allow_watch_bookmarks=True,
        timeout_seconds=10,
    )
    assert [e["type"] for e in allowed] == ["BOOKMARK", "BOOKMARK"]
    # Without allowWatchBookmarks the stream stays silent until its timeout.
    silent = await collect(
        core.list_namespaced_config_map, "default", count=1, resource_version=rv, timeout_seconds=1
    )
    assert silent == []


async def test_send_initial_events_ends_with_an_annotated_bookmark(
    api_client: client.ApiClient,
) -> None:
    core = client.CoreV1Api(api_client)
    created = await core.create_namespaced_config_map("default", cm("a"))
    events = await collect(
        core.list_namespaced_config_map,
        "default",
        count=2,
        send_initial_events=True,
        resource_version_match="NotOlderThan",
        allow_watch_bookmarks=True,
        timeout_seconds=10,
    )
    assert [e["type"] for e in events] == ["ADDED", "BOOKMARK"]
    end = events[1]["raw_object"]["metadata"]
    assert end["annotations"] == {"k8s.io/initial-events-end": "true"}
    assert end["resourceVersion"] == created.metadata.resource_version
    # The real server's ListOptions validation: both companions are required.
    with pytest.raises(ApiException) as caught:
        await collect(
            core.list_namespaced_config_map,
            "default",
            count=1,
            send_initial_events=True,
            resource_version_match="NotOlderThan",
            timeout_seconds=10,
        )
    assert caught.value.status == 422


async def test_watch_from_before_compaction_gets_410(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    old = (await core.list_namespaced_config_map("default")).metadata.resource_version
    await core.create_namespaced_config_map("default", cm("a"))
    apiserver.compact()
    # With a server-side timeout the client does not retry: the ERROR event raises.
    with pytest.raises(ApiException) as caught:
        await collect(
            core.list_namespaced_config_map,
            "default",
            count=1,
            resource_version=old,
            timeout_seconds=10,
        )
    assert caught.value.status == 410
    reason = str(caught.value.reason)
    assert reason.startswith("Expired: too old resource version")
    # Watching forever, the client retries once with the same resourceVersion, then raises.
    before = apiserver.requests[("watch", "configmaps")]
    with pytest.raises(ApiException) as caught:
        await collect(core.list_namespaced_config_map, "default", count=1, resource_version=old)
    assert caught.value.status == 410
    assert apiserver.requests[("watch", "configmaps")] - before == 2


async def test_a_cut_watch_ends_the_stream(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    rv = (await core.list_namespaced_config_map("default")).metadata.resource_version
    task = asyncio.create_task(
        collect(
            core.list_namespaced_config_map,
            "default",
            count=5,
            resource_version=rv,
            timeout_seconds=30,
        )
    )
    await _wait_for_watchers(apiserver, 1)
    await core.create_namespaced_config_map("default", cm("a"))
    await asyncio.sleep(0.05)
    assert apiserver.cut_watches() == 1
    events = await asyncio.wait_for(task, 5)
    assert names(events) == [("ADDED", "a")]


async def test_a_client_watching_forever_resumes_after_a_cut(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    rv = (await core.list_namespaced_config_map("default")).metadata.resource_version
    task = asyncio.create_task(
        collect(core.list_namespaced_config_map, "default", count=2, resource_version=rv)
    )
    await _wait_for_watchers(apiserver, 1)
    await core.create_namespaced_config_map("default", cm("a"))
    assert apiserver.cut_watches() == 1
    await core.create_namespaced_config_map("default", cm("b"))
    events = await asyncio.wait_for(task, 5)
    # The client resumed from the last revision it saw: nothing lost, nothing repeated.
    assert names(events) == [("ADDED", "a"), ("ADDED", "b")]
    assert apiserver.requests[("watch", "configmaps")] == 2


async def test_a_reset_watch_connection_is_a_client_error(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    rv = (await core.list_namespaced_config_map("default")).metadata.resource_version
    task = asyncio.create_task(
        collect(
            core.list_namespaced_config_map,
            "default",
            count=1,
            resource_version=rv,
            timeout_seconds=30,
        )
    )
    await _wait_for_watchers(apiserver, 1)
    apiserver.cut_watches(abort=True)
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(task, 5)


async def test_stop_refuses_connections_and_start_keeps_state(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    kept = await core.create_namespaced_config_map("default", cm("kept"))
    port = apiserver.port
    watching = asyncio.create_task(
        collect(
            core.list_namespaced_config_map,
            "default",
            count=1,
            resource_version=kept.metadata.resource_version,
            timeout_seconds=30,
        )
    )
    await _wait_for_watchers(apiserver, 1)
    await apiserver.stop()
    # An open watch loses its connection.
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(watching, 5)
    with pytest.raises(aiohttp.ClientConnectorError):  # connection refused
        await core.list_namespaced_config_map("default")
    # State may be changed while the server is down, as another writer would.
    apiserver.create("", "v1", "configmaps", {"metadata": {"name": "new", "namespace": "default"}})
    await apiserver.start()
    assert apiserver.port == port
    listed = await core.list_namespaced_config_map("default")
    assert [i.metadata.name for i in listed.items] == ["kept", "new"]


async def test_injected_failures_and_request_counts(
    apiserver: ApiServer, api_client: client.ApiClient
) -> None:
    core = client.CoreV1Api(api_client)
    apiserver.fail_next(2)
    for _ in range(2):
        with pytest.raises(ApiException) as caught:
            await core.list_namespaced_config_map("default")
        assert caught.value.status == 500
    await core.list_namespaced_config_map("default")
    assert apiserver.requests[("list", "configmaps")] == 3
    apiserver.fail_fraction(1.0, code=503)
    with pytest.raises(ApiException) as caught:
        await core.read_namespace("default")
    assert caught.value.status == 503
    apiserver.clear_faults()
    await core.read_namespace("default")
    assert apiserver.requests[("get", "namespaces")] == 2
    await core.create_namespaced_config_map("default", cm("x"))
    await core.patch_namespaced_config_map("x", "default", {"data": {}}, _content_type=MERGE)
    assert apiserver.requests[("create", "configmaps")] == 1
    assert apiserver.requests[("patch", "configmaps")] == 1


async def test_slow_responses(apiserver: ApiServer, api_client: client.ApiClient) -> None:
    core = client.CoreV1Api(api_client)
    apiserver.delay = 0.5
    with pytest.raises(asyncio.TimeoutError):
        await core.list_namespaced_config_map("default", _request_timeout=0.1)
    apiserver.delay = 0.0
    await core.list_namespaced_config_map("default", _request_timeout=5)


async def test_control_endpoint_injects_faults_in_another_process(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.kube.apiserver",
        "--kubeconfig",
        str(kubeconfig),
        "--control-port",
        "0",
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        control = ready["control"]
        assert control.startswith("http://127.0.0.1:")
        api = await config.new_client_from_config(config_file=str(kubeconfig))
        try:
            core = client.CoreV1Api(api)
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{control}/fail-next?count=1&code=503") as resp:
                    assert resp.status == 200
                with pytest.raises(ApiException) as caught:
                    await core.list_namespace()
                assert caught.value.status == 503
                await core.list_namespace()
                async with http.get(f"{control}/requests") as resp:
                    assert (await resp.json())["list namespaces"] == 2
                async with http.post(f"{control}/delay?seconds=abc") as resp:
                    assert resp.status == 400
                async with http.post(f"{control}/stop") as resp:
                    assert (await resp.json()) == {"running": False}
                with pytest.raises(aiohttp.ClientConnectorError):
                    await core.list_namespace()
                async with http.post(f"{control}/start") as resp:
                    assert (await resp.json())["running"] is True
                assert len((await core.list_namespace()).items) == 5
        finally:
            await api.close()
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
