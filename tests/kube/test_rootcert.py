"""The istio-ca-root-cert ConfigMaps, written by the leader only, against the emulator."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio.client import ApiClient

from meshpilot.kube.backoff import Backoff
from meshpilot.kube.client import new_api_client
from meshpilot.kube.leader import Timings
from meshpilot.kube.listwatch import WatchEvent
from meshpilot.kube.rootcert import (
    CONFIGMAP_NAME,
    DATA_KEY,
    RootCertPublisher,
    namespace_events,
    root_cert_election,
)
from tests.kube.apiserver import ApiServer
from tests.kube.helpers import wait_until

ROOT_A = "-----BEGIN CERTIFICATE-----\nROOT-A\n-----END CERTIFICATE-----\n"
ROOT_B = "-----BEGIN CERTIFICATE-----\nROOT-B\n-----END CERTIFICATE-----\n"
FAST = Timings(lease_duration=3.0, renew_deadline=1.5, retry_period=0.375)


def root_in(apiserver: ApiServer, ns: str) -> str | None:
    obj = apiserver.get("", "v1", "configmaps", ns, CONFIGMAP_NAME)
    if obj is None:
        return None
    assert obj["metadata"]["labels"]["istio.io/config"] == "true"
    data: dict[str, str] = obj["data"]
    return data[DATA_KEY]


def new_namespace(apiserver: ApiServer, name: str) -> None:
    apiserver.create("", "v1", "namespaces", {"metadata": {"name": name}})


@pytest.fixture
async def api(kubeconfig: Path) -> AsyncIterator[ApiClient]:
    client = await new_api_client(kubeconfig, None, False)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def running(publisher: RootCertPublisher) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(publisher.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_every_mesh_namespace_gets_the_root_and_keeps_it(
    apiserver: ApiServer, api: ApiClient
) -> None:
    new_namespace(apiserver, "bookinfo")
    publisher = RootCertPublisher(api, ROOT_A, namespace_events(api))
    async with running(publisher):
        mesh = ("default", "istio-system", "bookinfo")
        await wait_until(lambda: all(root_in(apiserver, ns) == ROOT_A for ns in mesh), 5)
        # Never in the namespaces Istio leaves alone.
        for ns in ("kube-system", "kube-public", "kube-node-lease"):
            assert root_in(apiserver, ns) is None

        new_namespace(apiserver, "reviews")
        await wait_until(lambda: root_in(apiserver, "reviews") == ROOT_A, 5)

        apiserver.delete("", "v1", "configmaps", "bookinfo", CONFIGMAP_NAME)
        await wait_until(lambda: root_in(apiserver, "bookinfo") == ROOT_A, 5)

        # Someone edits it: our key and label come back, their extra key stays.
        edited = apiserver.get("", "v1", "configmaps", "default", CONFIGMAP_NAME)
        assert edited is not None
        edited["data"] = {DATA_KEY: "tampered", "extra": "kept"}
        rt = apiserver._rt("", "v1", "configmaps")
        apiserver.rest.update(rt, "v1", "default", CONFIGMAP_NAME, edited)
        await wait_until(lambda: root_in(apiserver, "default") == ROOT_A, 5)
        restored = apiserver.get("", "v1", "configmaps", "default", CONFIGMAP_NAME)
        assert restored is not None and restored["data"]["extra"] == "kept"

        publisher.set_root(ROOT_B)
        await wait_until(
            lambda: all(root_in(apiserver, ns) == ROOT_B for ns in (*mesh, "reviews")), 5
        )
        assert publisher.writes["create"] == 5  # four namespaces, one recreation
    # Once converged, nothing more is written.
    assert apiserver.requests[("update", "configmaps")] == publisher.writes["update"]


async def test_a_deletion_while_the_watch_was_down_is_repaired_after_relisting(
    apiserver: ApiServer, api: ApiClient
) -> None:
    publisher = RootCertPublisher(api, ROOT_A, namespace_events(api))
    async with running(publisher):
        await wait_until(lambda: root_in(apiserver, "default") == ROOT_A, 5)
        await apiserver.stop()
        apiserver.delete("", "v1", "configmaps", "default", CONFIGMAP_NAME)
        apiserver.compact()
        await apiserver.start()
        await wait_until(lambda: root_in(apiserver, "default") == ROOT_A, 8)


async def test_a_namespace_deleted_before_the_write_is_dropped_without_error(
    apiserver: ApiServer, api: ApiClient
) -> None:
    publisher = RootCertPublisher(api, ROOT_A, namespace_events(api))
    async with running(publisher) as task:
        await wait_until(lambda: root_in(apiserver, "istio-system") == ROOT_A, 5)
        new_namespace(apiserver, "short-lived")
        apiserver.delete("", "v1", "namespaces", "", "short-lived")
        new_namespace(apiserver, "after")
        await wait_until(lambda: root_in(apiserver, "after") == ROOT_A, 5)
        assert not task.done()


async def test_a_failing_namespace_feed_is_started_again(
    apiserver: ApiServer, api: ApiClient
) -> None:
    calls = 0

    async def broken() -> AsyncIterator[WatchEvent]:
        raise RuntimeError("the namespace source fell over")
        yield WatchEvent("ADDED")  # pragma: no cover

    def feed() -> AsyncIterator[WatchEvent]:
        nonlocal calls
        calls += 1
        return broken() if calls == 1 else namespace_events(api)()

    publisher = RootCertPublisher(api, ROOT_A, feed, backoff=lambda: Backoff(0.05, 0.1))
    async with running(publisher) as task:
        await wait_until(lambda: root_in(apiserver, "default") == ROOT_A, 5)
        assert calls == 2 and not task.done()


async def test_only_the_leader_writes_and_a_new_leader_takes_over_the_writing(
    apiserver: ApiServer, kubeconfig: Path
) -> None:
    apis = [await new_api_client(kubeconfig, None, False) for _ in range(2)]
    publishers = [RootCertPublisher(a, ROOT_A, namespace_events(a)) for a in apis]
    electors = [
        root_cert_election(a, p, identity=f"istiod-{i}", timings=FAST)
        for i, (a, p) in enumerate(zip(apis, publishers, strict=True))
    ]
    tasks = [asyncio.create_task(e.run()) for e in electors]
    try:
        await wait_until(lambda: any(e.is_leader for e in electors), 5)
        first = 0 if electors[0].is_leader else 1
        other = 1 - first
        await wait_until(lambda: root_in(apiserver, "default") == ROOT_A, 5)
        apiserver.delete("", "v1", "configmaps", "default", CONFIGMAP_NAME)
        await wait_until(lambda: root_in(apiserver, "default") == ROOT_A, 5)
        await asyncio.sleep(0.5)
        assert sum(publishers[other].writes.values()) == 0
        leader_writes = sum(publishers[first].writes.values())
        assert leader_writes >= 3

        # The leader goes away (releasing its lease); the other one writes from now on.
        tasks[first].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[first]
        await wait_until(lambda: electors[other].is_leader, 5)
        apiserver.delete("", "v1", "configmaps", "istio-system", CONFIGMAP_NAME)
        await wait_until(lambda: root_in(apiserver, "istio-system") == ROOT_A, 5)
        assert publishers[other].writes["create"] == 1
        assert sum(publishers[first].writes.values()) == leader_writes
    finally:
        for t in tasks:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for a in apis:
            await a.close()


def test_an_empty_root_is_refused() -> None:
    with pytest.raises(ValueError, match="root certificate to publish is empty"):
        RootCertPublisher(None, " ", None)  # type: ignore[arg-type]
