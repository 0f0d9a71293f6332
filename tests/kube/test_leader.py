"""Leader election on a Lease, against the API server emulator with the real client.

Timings are Istio's 30 s / 15 s / 7.5 s divided by ten. Under a loaded machine a stalled
event loop may end a term early, so the checks are "never two leaders", which no stall
can excuse, rather than "always exactly one".
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from kubernetes_asyncio.client import ApiClient, CoordinationV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from meshpilot.kube.client import new_api_client
from meshpilot.kube.leader import NAMESPACE_CONTROLLER, LeaderElector, Timings
from tests.kube.apiserver import ApiServer
from tests.kube.helpers import wait_until

FAST = Timings(lease_duration=3.0, renew_deadline=1.5, retry_period=0.375)
NS = "istio-system"


class Replica:
    """One elector with leader work that records when it runs and when it is stopped."""

    def __init__(self, api: ApiClient, identity: str, *, release_on_cancel: bool = True) -> None:
        self.started: list[float] = []
        self.stopped: list[float] = []
        self.writing = False
        self.elector = LeaderElector(
            api,
            NS,
            NAMESPACE_CONTROLLER,
            self._work,
            lambda: self.stopped.append(time.time()),
            identity=identity,
            timings=FAST,
            release_on_cancel=release_on_cancel,
        )
        self.task: asyncio.Task[None] | None = None

    async def _work(self) -> None:
        self.started.append(time.time())
        self.writing = True
        try:
            await asyncio.Event().wait()
        finally:
            self.writing = False

    def start(self) -> None:
        self.task = asyncio.create_task(self.elector.run())

    async def kill(self) -> None:
        assert self.task is not None
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def clients(kubeconfig: Path) -> AsyncIterator[Callable[[], ApiClient]]:
    made: list[ApiClient] = []

    async def make() -> ApiClient:
        api = await new_api_client(kubeconfig, None, False)
        made.append(api)
        return api

    pending = [await make(), await make(), await make()]
    yield lambda: pending.pop()
    for api in made:
        await api.close()


def lease(apiserver: ApiServer) -> dict[str, object]:
    obj = apiserver.get("coordination.k8s.io", "v1", "leases", NS, NAMESPACE_CONTROLLER)
    assert obj is not None
    spec = obj["spec"]
    assert isinstance(spec, dict)
    return spec


async def test_of_two_electors_exactly_one_leads_and_holds_the_lease(
    apiserver: ApiServer, clients: Callable[[], ApiClient]
) -> None:
    a, b = Replica(clients(), "istiod-a_1"), Replica(clients(), "istiod-b_1")
    a.start()
    b.start()
    try:
        await wait_until(lambda: a.writing or b.writing, 5)
        # Several renew periods: never both, and the leader stays the leader.
        for _ in range(12):
            assert not (a.writing and b.writing)
            await asyncio.sleep(FAST.retry_period / 2)
        await wait_until(lambda: a.writing or b.writing, 5)
        leader = a if a.writing else b
        spec = lease(apiserver)
        assert spec["holderIdentity"] == leader.elector.identity
        assert spec["leaseDurationSeconds"] == 3
    finally:
        await a.kill()
        await b.kill()


async def test_a_killed_leader_is_replaced_within_the_lease_time(
    apiserver: ApiServer, clients: Callable[[], ApiClient]
) -> None:
    a = Replica(clients(), "istiod-a_2", release_on_cancel=False)
    a.start()
    await wait_until(lambda: a.writing, 5)
    b = Replica(clients(), "istiod-b_2")
    b.start()
    try:
        await asyncio.sleep(1.0)
        assert not b.writing
        # A crash: no release, the lease is left to expire.
        await a.kill()
        killed = time.time()
        await wait_until(lambda: b.writing, FAST.lease_duration + 4 * FAST.retry_period)
        # Not before the lease could have expired: b waited out a whole lease duration.
        assert b.started[0] - killed >= FAST.lease_duration - FAST.retry_period - 0.1
        spec = lease(apiserver)
        assert spec["holderIdentity"] == "istiod-b_2"
        assert spec["leaseTransitions"] == 1
    finally:
        await b.kill()


async def test_a_stopped_leader_releases_the_lease_for_a_quick_takeover(
    apiserver: ApiServer, clients: Callable[[], ApiClient]
) -> None:
    a = Replica(clients(), "istiod-a_3")
    a.start()
    await wait_until(lambda: a.writing, 5)
    b = Replica(clients(), "istiod-b_3")
    b.start()
    try:
        await asyncio.sleep(0.6)
        await a.kill()
        assert not a.writing and len(a.stopped) == 1
        stopped = time.time()
        # Well inside one lease duration: the released lease has no holder.
        await wait_until(lambda: b.writing, FAST.lease_duration - 0.5)
        assert b.started[0] - stopped < FAST.lease_duration
    finally:
        await b.kill()


async def test_a_leader_that_cannot_renew_stops_writing_before_its_lease_expires(
    apiserver: ApiServer, clients: Callable[[], ApiClient]
) -> None:
    a = Replica(clients(), "istiod-a_4")
    a.start()
    try:
        await wait_until(lambda: a.writing, 5)
        await asyncio.sleep(0.6)
        renewed = lease(apiserver)["renewTime"]
        await apiserver.stop()
        await wait_until(lambda: not a.writing, FAST.lease_duration + 1)
        assert isinstance(renewed, str)
        last = datetime.datetime.fromisoformat(renewed.replace("Z", "+00:00")).timestamp()
        # The work ended before the lease written last could expire: no other replica
        # could have been writing yet.
        assert a.stopped[0] - last < FAST.lease_duration
        assert not a.elector.is_leader
        # Back online with its own identity still in the lease: it leads again.
        await apiserver.start()
        await wait_until(lambda: a.writing, 5)
        assert len(a.started) >= 2
    finally:
        await a.kill()


async def test_a_leader_that_sees_another_holder_stops_at_its_next_renewal(
    apiserver: ApiServer, clients: Callable[[], ApiClient]
) -> None:
    a = Replica(clients(), "istiod-a_7")
    a.start()
    try:
        await wait_until(lambda: a.writing, 5)
        # Someone else wrote the lease (an operator, or a replica with a skewed view).
        current = apiserver.get("coordination.k8s.io", "v1", "leases", NS, NAMESPACE_CONTROLLER)
        assert current is not None
        current["spec"]["holderIdentity"] = "istiod-intruder"
        rt = apiserver._rt("coordination.k8s.io", "v1", "leases")
        apiserver.rest.update(rt, "v1", NS, NAMESPACE_CONTROLLER, current)
        await wait_until(lambda: not a.writing, 2 * FAST.retry_period + 0.5)
        assert len(a.stopped) == 1 and not a.elector.is_leader
        assert lease(apiserver)["holderIdentity"] == "istiod-intruder"
    finally:
        await a.kill()


async def test_a_follower_only_reads_a_lease_that_is_kept_alive(
    apiserver: ApiServer, clients: Callable[[], ApiClient]
) -> None:
    def hold() -> None:
        current = apiserver.get("coordination.k8s.io", "v1", "leases", NS, NAMESPACE_CONTROLLER)
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": "istiod-other", "leaseDurationSeconds": 2, "renewTime": now}
        if current is None:
            apiserver.create(
                "coordination.k8s.io",
                "v1",
                "leases",
                {"metadata": {"name": NAMESPACE_CONTROLLER, "namespace": NS}, "spec": spec},
            )
        else:
            current["spec"] = spec
            rt = apiserver._rt("coordination.k8s.io", "v1", "leases")
            apiserver.rest.update(rt, "v1", NS, NAMESPACE_CONTROLLER, current, "")

    hold()
    b = Replica(clients(), "istiod-b_5")
    b.start()
    try:
        for _ in range(10):
            await asyncio.sleep(0.3)
            hold()
        assert not b.writing
        writes = {k: v for k, v in apiserver.requests.items() if k[1] == "leases"}
        assert writes.get(("get", "leases"), 0) >= 5
        assert ("update", "leases") not in writes and ("create", "leases") not in writes
        # Once the other holder stops renewing, the follower takes over.
        await wait_until(lambda: b.writing, FAST.lease_duration + 1)
    finally:
        await b.kill()


async def test_concurrent_creates_leave_one_leader(
    apiserver: ApiServer, clients: Callable[[], ApiClient]
) -> None:
    api = clients()
    replicas = [Replica(api, f"istiod-{i}_6") for i in range(4)]
    for r in replicas:
        r.start()
    try:
        await wait_until(lambda: any(r.writing for r in replicas), 5)
        for _ in range(8):
            assert sum(r.writing for r in replicas) <= 1
            await asyncio.sleep(FAST.retry_period / 2)
        assert apiserver.requests[("create", "leases")] >= 1
    finally:
        for r in replicas:
            await r.kill()


def test_timings_must_let_the_holder_give_up_before_a_takeover() -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        Timings(lease_duration=10, renew_deadline=10, retry_period=1)
    assert Timings() == Timings(30.0, 15.0, 7.5)


async def test_the_emulator_refuses_lease_times_a_real_server_cannot_parse(
    clients: Callable[[], ApiClient],
) -> None:
    leases = CoordinationV1Api(clients())
    body = {
        "metadata": {"name": "x"},
        "spec": {"holderIdentity": "a", "renewTime": "2026-01-01T00:00:00Z"},
    }
    with pytest.raises(ApiException) as e:
        await leases.create_namespaced_lease(NS, body)  # type: ignore[arg-type]
    assert e.value.status == 400 and "2006-01-02T15:04:05.000000Z07:00" in str(e.value.body)
    body["spec"]["renewTime"] = "2026-01-01T00:00:00.000000Z"  # type: ignore[index]
    await leases.create_namespaced_lease(NS, body)  # type: ignore[arg-type]
