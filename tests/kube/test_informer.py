"""The informer against the API server emulator, through the real kubernetes_asyncio client:
paginated list, watch, bookmarks, resume, 410 and relist by difference, outages, faults,
selectors and bounds."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from kubernetes_asyncio import client

from meshpilot.discovery.kube.informer import Informer
from meshpilot.discovery.kube.resource import EventType, InformerEvent, Resource
from meshpilot.kube.backoff import Backoff
from meshpilot.monitoring import metrics
from tests.kube.apiserver import ApiServer
from tests.kube.helpers import NET, vs

CONFIGMAPS = Resource("", "v1", "configmaps", "ConfigMap")
VIRTUAL_SERVICES = Resource(NET, "v1", "virtualservices", "VirtualService")
Seen = list[tuple[str, str]]


def fast_backoff() -> Backoff:
    return Backoff(0.05, 0.2)


def add_cm(server: ApiServer, name: str, ns: str = "default", **data: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    return server.create("", "v1", "configmaps", {"metadata": meta, "data": data})


def update_cm(server: ApiServer, name: str, ns: str = "default", **data: str) -> None:
    current = server.get("", "v1", "configmaps", ns, name)
    assert current is not None
    current["data"] = data
    server.rest.update(server._rt("", "v1", "configmaps"), "v1", ns, name, current, "")


async def until(cond: Callable[[], bool]) -> None:
    """Wait (up to 10 s) for `cond`; the state changes arrive over real watches."""
    async with asyncio.timeout(10):
        while not cond():  # noqa: ASYNC110 - polls state the informer task changes
            await asyncio.sleep(0.02)


class Recorder:
    def __init__(self) -> None:
        self.events: list[InformerEvent] = []

    def __call__(self, event: InformerEvent) -> None:
        self.events.append(event)

    def seen(self) -> Seen:
        return [(e.type.value, e.key[1]) for e in self.events]

    def clear(self) -> None:
        self.events.clear()


@pytest.fixture
async def informers(api_client: client.ApiClient) -> AsyncIterator[list[Informer]]:
    made: list[Informer] = []
    yield made
    for inf in made:
        await inf.stop()


def make(
    made: list[Informer], api: client.ApiClient, resource: Resource = CONFIGMAPS, **kw: Any
) -> tuple[Informer, Recorder]:
    kw.setdefault("backoff", fast_backoff())
    inf = Informer(api, resource, **kw)
    rec = Recorder()
    inf.add_handler(rec)
    made.append(inf)
    return inf, rec


async def test_list_is_paginated_then_watch_sees_add_update_delete(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    for i in range(120):
        add_cm(apiserver, f"cm-{i:03d}", "default" if i % 2 else "kube-public", n=str(i))
    inf, rec = make(informers, api_client, page_size=50)
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    assert apiserver.requests[("list", "configmaps")] == 3
    assert len(inf) == 120 and inf.get(("kube-public", "cm-000")) is not None
    assert all(t == "ADDED" for t, _ in rec.seen()) and len(rec.events) == 120
    assert inf.connected and inf.status()["synced"]
    rec.clear()

    await apiserver.store.wait_for_watchers(1, timeout=5)
    add_cm(apiserver, "fresh", a="1")
    update_cm(apiserver, "cm-001", n="changed")
    apiserver.delete("", "v1", "configmaps", "kube-public", "cm-002")
    await until(lambda: len(rec.events) == 3)
    assert rec.seen() == [("ADDED", "fresh"), ("MODIFIED", "cm-001"), ("DELETED", "cm-002")]
    modified = rec.events[1]
    assert modified.old is not None and modified.old["data"] == {"n": "1"}
    assert modified.obj["data"] == {"n": "changed"}
    assert inf.get(("kube-public", "cm-002")) is None
    assert inf.resource_version == str(apiserver.store.rv)


async def test_bookmarks_advance_the_resume_version(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    inf, rec = make(informers, api_client)
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    listed_at = inf.resource_version
    # Changes to another resource move the server's revision, not this informer's objects.
    for i in range(3):
        apiserver.create(
            "", "v1", "secrets", {"metadata": {"name": f"s{i}", "namespace": "default"}}
        )
    await until(lambda: inf.resource_version == str(apiserver.store.rv))
    assert int(inf.resource_version) > int(listed_at)
    assert rec.events == []
    # History up to now forgotten: resuming from the list's version would be a 410 and
    # a relist; from the bookmark's version it is a plain resume.
    apiserver.compact()
    apiserver.cut_watches()
    add_cm(apiserver, "after")
    await until(lambda: rec.seen() == [("ADDED", "after")])
    assert inf.lists == 1 and apiserver.requests[("list", "configmaps")] == 1


async def test_a_cut_watch_resumes_without_relisting(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    add_cm(apiserver, "a")
    inf, rec = make(informers, api_client)
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    for abort in (False, True):
        await apiserver.store.wait_for_watchers(1, timeout=5)
        rec.clear()
        assert apiserver.cut_watches(abort=abort) == 1
        add_cm(apiserver, f"after-cut-{abort}".lower())
        await until(lambda: len(rec.events) == 1)
        assert rec.seen() == [("ADDED", f"after-cut-{abort}".lower())]
    assert apiserver.requests[("list", "configmaps")] == 1
    assert apiserver.requests[("watch", "configmaps")] >= 3


async def test_expired_version_relists_and_applies_only_the_difference(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    for name in ("same", "changed", "gone"):
        add_cm(apiserver, name, v="1")
    inf, rec = make(informers, api_client)
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    rec.clear()
    await apiserver.stop()
    update_cm(apiserver, "changed", v="2")
    apiserver.delete("", "v1", "configmaps", "default", "gone")
    add_cm(apiserver, "new")
    apiserver.compact()
    await apiserver.start()
    await until(lambda: inf.lists == 2 and inf.connected)
    assert sorted(rec.seen()) == [("ADDED", "new"), ("DELETED", "gone"), ("MODIFIED", "changed")]
    assert set(k[1] for k in inf.items()) == {"same", "changed", "new"}
    # The relist found the watch version expired: a 410, not a failure to back off from.
    assert apiserver.requests[("list", "configmaps")] == 2


async def test_outage_keeps_the_cache_and_converges_after(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    add_cm(apiserver, "kept", v="1")
    add_cm(apiserver, "doomed")
    inf, rec = make(informers, api_client)
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    rec.clear()
    before = metrics.KUBE_INFORMER_RECONNECTS.labels("configmaps")._value.get()
    await apiserver.stop()
    update_cm(apiserver, "kept", v="2")
    apiserver.delete("", "v1", "configmaps", "default", "doomed")
    await asyncio.sleep(3)
    # Down: the last known state is still served and the outage is visible.
    assert {k[1] for k in inf.items()} == {"kept", "doomed"}
    assert not inf.connected and inf.last_error
    assert inf.status()["connected"] is False
    assert metrics.KUBE_INFORMER_CONNECTED.labels("configmaps")._value.get() == 0
    assert metrics.KUBE_INFORMER_RECONNECTS.labels("configmaps")._value.get() > before
    await apiserver.start()
    await until(lambda: {k[1] for k in inf.items()} == {"kept"} and inf.connected)
    assert sorted(rec.seen()) == [("DELETED", "doomed"), ("MODIFIED", "kept")]
    assert inf.get(("default", "kept"))["data"] == {"v": "2"}  # type: ignore[index]
    # The history was still there: resumed, not relisted.
    assert inf.lists == 1
    assert metrics.KUBE_INFORMER_CONNECTED.labels("configmaps")._value.get() == 1


async def test_server_errors_and_slow_responses_back_off_and_recover(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    add_cm(apiserver, "a")
    apiserver.fail_next(4)
    inf, _ = make(informers, api_client, request_timeout=0.3)
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    assert inf.reconnects == 4 and "HTTP 500" in inf.last_error
    assert apiserver.requests[("list", "configmaps")] == 5

    # A server slower than the request timeout: timeouts, retried, no crash.
    await apiserver.store.wait_for_watchers(1, timeout=5)
    apiserver.delay = 0.6
    apiserver.cut_watches()
    await until(lambda: inf.last_error == "request timed out")
    apiserver.clear_faults()
    add_cm(apiserver, "b")
    await until(lambda: inf.get(("default", "b")) is not None and inf.connected)


async def test_label_and_field_selectors(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    for name, app in (("x1", "x"), ("x2", "x"), ("y1", "y")):
        apiserver.create(
            "",
            "v1",
            "configmaps",
            {"metadata": {"name": name, "namespace": "default", "labels": {"app": app}}},
        )
    add_cm(apiserver, "x1", "kube-public")
    by_label, rec = make(informers, api_client, label_selector="app=x")
    by_field, _ = make(informers, api_client, field_selector="metadata.namespace=kube-public")
    by_label.start()
    by_field.start()
    await asyncio.wait_for(by_label.synced.wait(), 10)
    await asyncio.wait_for(by_field.synced.wait(), 10)
    assert sorted(by_label.items()) == [("default", "x1"), ("default", "x2")]
    assert list(by_field.items()) == [("kube-public", "x1")]
    rec.clear()
    await apiserver.store.wait_for_watchers(2, timeout=5)
    # Relabelled out of the selection: the informer hears a delete.
    current = apiserver.get("", "v1", "configmaps", "default", "x2")
    assert current is not None
    current["metadata"]["labels"] = {"app": "z"}
    apiserver.rest.update(apiserver._rt("", "v1", "configmaps"), "v1", "default", "x2", current, "")
    await until(lambda: rec.seen() == [("DELETED", "x2")])


async def test_custom_objects_across_namespaces(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    for ns in ("default", "kube-public"):
        apiserver.create(
            NET, "v1", "virtualservices", {**vs("r"), "metadata": {"name": "r", "namespace": ns}}
        )
    inf, rec = make(informers, api_client, VIRTUAL_SERVICES)
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    assert sorted(inf.items()) == [("default", "r"), ("kube-public", "r")]
    assert rec.events[0].obj["kind"] == "VirtualService"
    assert rec.events[0].obj["apiVersion"] == f"{NET}/v1"


async def test_object_cap_and_size_cap_refuse_and_keep_serving(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    for i in range(5):
        add_cm(apiserver, f"c{i}")
    inf, rec = make(informers, api_client, max_objects=3, max_object_bytes=2000)
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    assert len(inf) == 3 and len(inf.refused) == 2
    assert "over the limit of 3 objects" in inf.last_error
    refused = inf.status()["refused"]
    assert all("limit of 3 objects" in why for why in refused.values())

    # Room again: a delete frees a slot, and a new object takes it.
    kept = sorted(inf.items())
    await apiserver.store.wait_for_watchers(1, timeout=5)
    apiserver.delete("", "v1", "configmaps", *kept[0])
    await until(lambda: len(inf) == 2)
    add_cm(apiserver, "late")
    await until(lambda: inf.get(("default", "late")) is not None)

    # Over the size cap: refused with its name; the last good version stays.
    update_cm(apiserver, "late", big="x" * 3000)
    await until(lambda: ("default", "late") in inf.refused)
    assert "ConfigMap default/late refused: object of" in inf.last_error
    assert (
        inf.get(("default", "late"))["data"] is None
        or "big" not in inf.get(("default", "late"))["data"]
    )  # type: ignore[index,operator]
    update_cm(apiserver, "late", small="y")
    await until(lambda: ("default", "late") not in inf.refused)
    assert inf.get(("default", "late"))["data"] == {"small": "y"}  # type: ignore[index]
    assert rec.events[-1].type is EventType.MODIFIED


async def test_a_watch_event_over_the_line_cap_is_skipped_and_its_object_refused(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    add_cm(apiserver, "grows", v="small")
    add_cm(apiserver, "listed-big", v="x" * 5000)
    inf, rec = make(informers, api_client, max_object_bytes=1000)
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    # Over the size cap in the list already: refused there, by name.
    assert list(inf.items()) == [("default", "grows")]
    assert "over the 1000 limit" in inf.refused[("default", "listed-big")]
    rec.clear()
    await apiserver.store.wait_for_watchers(1, timeout=5)
    # Far over the per-line cap (4 x the object cap + 64 KiB): never buffered whole.
    update_cm(apiserver, "grows", v="x" * 300_000)
    add_cm(apiserver, "after")
    await until(lambda: inf.get(("default", "after")) is not None)
    assert "object of" in inf.refused[("default", "grows")]
    assert inf.get(("default", "grows"))["data"] == {"v": "small"}  # type: ignore[index]
    assert inf.lists == 1 and inf.connected
    # Its deletion still arrives, though that event is as large.
    apiserver.delete("", "v1", "configmaps", "default", "grows")
    await until(lambda: inf.get(("default", "grows")) is None)
    assert ("default", "grows") not in inf.refused
    assert rec.seen() == [("ADDED", "after"), ("DELETED", "grows")]


async def test_a_failing_handler_stops_neither_the_informer_nor_other_handlers(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    def broken(event: InformerEvent) -> None:
        raise RuntimeError("handler bug")

    inf = Informer(api_client, CONFIGMAPS, backoff=fast_backoff())
    informers.append(inf)
    rec = Recorder()
    inf.add_handler(broken)
    inf.add_handler(rec)
    add_cm(apiserver, "a")
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    await apiserver.store.wait_for_watchers(1, timeout=5)
    add_cm(apiserver, "b")
    await until(lambda: rec.seen() == [("ADDED", "a"), ("ADDED", "b")])
    assert inf.connected and inf.reconnects == 0


async def test_watches_closed_at_once_again_and_again_are_paced(
    apiserver: ApiServer, api_client: client.ApiClient, informers: list[Informer]
) -> None:
    inf, rec = make(informers, api_client, backoff=Backoff(0.2, 0.4))
    inf.start()
    await asyncio.wait_for(inf.synced.wait(), 10)
    before = apiserver.requests[("watch", "configmaps")]
    loop = asyncio.get_running_loop()
    end = loop.time() + 1.0
    while loop.time() < end:
        apiserver.cut_watches()
        await asyncio.sleep(0.005)
    # Unpaced, a reconnect per cut: ~200. Paced: one at once, then one per 0.1-0.4 s.
    assert apiserver.requests[("watch", "configmaps")] - before <= 15
    # A clean close is no failure: nothing counted, still served.
    assert inf.reconnects == 0
    add_cm(apiserver, "after")
    await until(lambda: rec.seen() == [("ADDED", "after")])
    assert inf.lists == 1


def test_backoff_doubles_from_one_second_to_thirty_with_jitter() -> None:
    backoff = Backoff(rng=random.Random(7))
    delays = [backoff.next() for _ in range(8)]
    ceilings = [1, 2, 4, 8, 16, 30, 30, 30]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    # Jitter: not the same delay twice at the cap.
    assert len(set(delays[5:])) == 3
    backoff.reset()
    assert 0.5 <= backoff.next() <= 1
    with pytest.raises(ValueError, match="initial <= maximum"):
        Backoff(5, 1)
