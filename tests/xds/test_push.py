"""Debounced pushes: quiet period, hard maximum, no storms, failures keep the last context."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from meshpilot.config import ConfigKey
from meshpilot.model.push_request import PushRequest
from meshpilot.xds.push import Pusher
from tests.xds.client import names_of
from tests.xds.conftest import CDS, EDS, Harness, eventually, sample
from tests.xds.fake_generator import FakeContext

AFTER = 0.05
MAX = 0.3


@dataclass
class Recorder:
    """A build_context and a push target that record what they were given."""

    builds: list[tuple[FakeContext | None, PushRequest]] = field(default_factory=list)
    pushes: list[tuple[PushRequest, FakeContext, float]] = field(default_factory=list)
    pushed: asyncio.Event = field(default_factory=asyncio.Event)

    def build(self, previous: FakeContext | None, request: PushRequest) -> FakeContext:
        self.builds.append((previous, request))
        return FakeContext(f"v{len(self.builds)}")

    def target(self, request: PushRequest, context: FakeContext) -> None:
        self.pushes.append((request, context, time.monotonic()))
        self.pushed.set()

    async def wait_pushes(self, n: int, within: float = 2.0) -> None:
        async with asyncio.timeout(within):
            while len(self.pushes) < n:
                self.pushed.clear()
                await self.pushed.wait()


def change(i: int, *, full: bool = True) -> PushRequest:
    return PushRequest(
        full=full,
        config_keys=frozenset({ConfigKey("VirtualService", "default", f"vs{i}")}),
        reasons=frozenset({f"r{i}"}),
        eds_hosts=frozenset() if full else frozenset({f"h{i}"}),
    )


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[Recorder, Pusher[FakeContext]]]:
    rec = Recorder()
    pusher = Pusher(
        rec.build, rec.target, debounce_after=AFTER, debounce_max=MAX, context=FakeContext("v0")
    )
    pusher.start()
    try:
        yield rec, pusher
    finally:
        await pusher.stop()


async def test_burst_is_merged_into_one_push_after_the_quiet_period(
    recorder: tuple[Recorder, Pusher[FakeContext]],
) -> None:
    rec, pusher = recorder
    last = 0.0
    for i in range(5):
        pusher.enqueue(change(i, full=i == 2))
        last = time.monotonic()
        await asyncio.sleep(0.01)
    await rec.wait_pushes(1)
    await asyncio.sleep(AFTER * 3)
    assert len(rec.pushes) == 1
    request, context, at = rec.pushes[0]
    assert at - last >= AFTER * 0.9
    assert request.reasons == {f"r{i}" for i in range(5)}
    assert len(request.config_keys) == 5
    assert request.full
    assert rec.builds[0][0] == FakeContext("v0")
    assert pusher.current == context == FakeContext("v1")


async def test_endpoint_only_bursts_stay_endpoint_only(
    recorder: tuple[Recorder, Pusher[FakeContext]],
) -> None:
    rec, pusher = recorder
    pusher.enqueue(change(1, full=False))
    pusher.enqueue(change(2, full=False))
    await rec.wait_pushes(1)
    request = rec.pushes[0][0]
    assert not request.full
    assert request.eds_hosts == {"h1", "h2"}


async def test_max_delay_bounds_a_continuous_stream_of_changes() -> None:
    # Its own, wider timings: a change every 20 ms must never leave a quiet period,
    # even when a loaded machine stretches a sleep well past 20 ms.
    after, maximum = 0.25, 0.6
    rec = Recorder()
    pusher = Pusher(
        rec.build, rec.target, debounce_after=after, debounce_max=maximum, context=FakeContext("v0")
    )
    pusher.start()
    try:
        first = time.monotonic()
        i = 0
        while time.monotonic() - first < maximum * 2:
            pusher.enqueue(change(i))
            i += 1
            await asyncio.sleep(0.02)
        assert len(rec.pushes) >= 1
        delay = rec.pushes[0][2] - first
        assert maximum * 0.9 <= delay <= maximum + 0.4
        assert len(rec.pushes[0][0].reasons) > 5  # many changes per push, not a storm
    finally:
        await pusher.stop()


async def test_changes_during_a_push_go_into_the_next_one() -> None:
    release = asyncio.Event()
    builds: list[PushRequest] = []
    running = 0
    overlap = False

    async def slow_build(previous: FakeContext | None, request: PushRequest) -> FakeContext:
        nonlocal running, overlap
        running += 1
        overlap = overlap or running > 1
        builds.append(request)
        await release.wait()
        running -= 1
        return FakeContext(f"v{len(builds)}")

    pushes: list[PushRequest] = []
    pusher = Pusher(slow_build, lambda r, c: pushes.append(r), debounce_after=0.01)
    pusher.start()
    try:
        pusher.enqueue(change(1))
        await eventually(lambda: builds)
        for i in range(2, 6):
            pusher.enqueue(change(i))
        await asyncio.sleep(0.05)
        assert len(builds) == 1  # still building the first: the rest wait
        release.set()
        await eventually(lambda: len(pushes) >= 2)
        await asyncio.sleep(0.05)
    finally:
        await pusher.stop()
    assert [p.reasons for p in pushes] == [{"r1"}, {"r2", "r3", "r4", "r5"}]
    assert not overlap


async def test_build_failure_keeps_the_last_context_and_retries_with_the_next_change() -> None:
    calls: list[PushRequest] = []

    def build(previous: FakeContext | None, request: PushRequest) -> FakeContext:
        calls.append(request)
        if len(calls) == 1:
            raise ValueError("broken index")
        return FakeContext("v2")

    pushes: list[FakeContext] = []
    pusher = Pusher(
        build, lambda r, c: pushes.append(c), debounce_after=0.01, context=FakeContext("v1")
    )
    pusher.start()
    try:
        pusher.enqueue(change(1))
        await eventually(lambda: calls)
        await asyncio.sleep(0.05)
        assert pusher.current == FakeContext("v1")
        assert pushes == []
        assert len(calls) == 1  # no hot retry loop
        pusher.enqueue(change(2))
        await eventually(lambda: pushes)
    finally:
        await pusher.stop()
    assert calls[1].reasons == {"r1", "r2"}
    assert pusher.current == FakeContext("v2")


async def test_push_metrics_are_recorded(
    recorder: tuple[Recorder, Pusher[FakeContext]],
) -> None:
    rec, pusher = recorder
    debounces = sample("pilot_debounce_time_count")
    triggers = sample("pilot_push_triggers_total", type="r77")
    pusher.enqueue(change(77))
    await rec.wait_pushes(1)
    assert sample("pilot_debounce_time_count") == debounces + 1
    assert sample("pilot_push_triggers_total", type="r77") == triggers + 1


async def test_init_builds_and_pushes_without_debounce() -> None:
    rec = Recorder()
    pusher = Pusher(rec.build, rec.target, debounce_after=5, debounce_max=10)
    ctx = await pusher.init()
    assert ctx == FakeContext("v1")
    assert rec.builds[0][0] is None
    assert rec.pushes[0][0].full


def test_invalid_debounce_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="debounce_max"):
        Pusher(Recorder().build, Recorder().target, debounce_after=1, debounce_max=0.5)


async def test_pusher_drives_the_discovery_server(harness: Harness) -> None:
    versions = iter(range(2, 100))
    pusher = Pusher(
        lambda prev, req: FakeContext(f"v{next(versions)}"),
        harness.discovery.push,
        debounce_after=0.02,
    )
    pusher.start()
    try:
        c = harness.sotw()
        c.request(CDS)
        c.ack(await c.recv())
        c.request(EDS, ["a"])
        c.ack(await c.recv(), ["a"])
        await harness.settled()
        harness.gen.put(EDS, "a", tag="2")
        for _ in range(3):
            pusher.enqueue(PushRequest(full=False, eds_hosts=frozenset({"a"})))
        resp = await c.recv()
        assert resp.type_url == EDS
        assert names_of(resp) == ["a"]
        assert resp.version_info == "v2"
        c.ack(resp, ["a"])
        await c.expect_nothing()
    finally:
        await pusher.stop()
