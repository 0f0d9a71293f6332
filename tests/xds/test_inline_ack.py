"""Plain ACKs handled by the stream reader while the connection task is idle.

The fast path must be invisible: it takes only ACKs that need no answer and release
no coalesced push, only while the connection task has nothing queued or running, and
records exactly what the connection task would have recorded.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_request import PushRequest
from meshpilot.xds import typeurls
from meshpilot.xds.connection import Connection, Interner, Kind, PendingPush
from meshpilot.xds.server import DiscoveryServer
from meshpilot.xds.wire import SotwRequest
from tests.xds.client import names_of, node, tags_of
from tests.xds.conftest import CDS, EDS, Harness, eventually, sample
from tests.xds.fake_generator import FakeContext
from tests.xds.test_sotw import subscribe

NAMES = [f"outbound|9080||svc{i}.default.svc.cluster.local" for i in range(20)]


def _sotw(
    names: list[str], nonce: str = "", version: str = "", error: str | None = None
) -> SotwRequest:
    msg = discovery_pb2.DiscoveryRequest(
        type_url=EDS, resource_names=names, response_nonce=nonce, version_info=version
    )
    if error is not None:
        msg.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return SotwRequest.parse(msg.SerializeToString())


def _sent(conn: Connection, nonce: str) -> None:
    w = conn.watched[EDS]
    w.nonce_sent, w.version_sent, w.awaiting_ack = nonce, "v2", True


def _sotw_conn() -> Connection:
    conn = Connection("c-1", Proxy.from_node(node()), delta=False)
    assert conn.on_sotw_request(_sotw(NAMES)).kind is Kind.INIT
    _sent(conn, "n1")
    return conn


def test_sotw_plain_ack_is_recognised() -> None:
    conn = _sotw_conn()
    assert conn.is_plain_ack(_sotw(NAMES, "n1", "v2"))


@pytest.mark.parametrize(
    "case",
    ["nack", "stale", "names_changed", "names_reordered", "no_nonce", "not_awaiting"],
)
def test_sotw_requests_that_are_not_plain_acks(case: str) -> None:
    conn = _sotw_conn()
    req = {
        "nack": lambda: _sotw(NAMES, "n1", "v1", error="bad"),
        "stale": lambda: _sotw(NAMES, "n0", "v1"),
        "names_changed": lambda: _sotw([*NAMES, "extra"], "n1", "v2"),
        "names_reordered": lambda: _sotw(NAMES[::-1], "n1", "v2"),
        "no_nonce": lambda: _sotw(NAMES),
        "not_awaiting": lambda: _sotw(NAMES, "n1", "v2"),
    }[case]()
    if case == "not_awaiting":
        conn.watched[EDS].awaiting_ack = False
    assert not conn.is_plain_ack(req)


def test_sotw_ack_releasing_a_coalesced_push_is_not_plain() -> None:
    conn = _sotw_conn()
    conn.watched[EDS].dirty = PushRequest(full=False, eds_hosts=frozenset({"x"}))
    assert not conn.is_plain_ack(_sotw(NAMES, "n1", "v2"))


def test_sotw_ack_after_cds_push_is_not_plain() -> None:
    # EDS after a CDS change must still be answered (warming clusters).
    conn = _sotw_conn()
    conn.watched[EDS].always_respond = True
    assert not conn.is_plain_ack(_sotw(NAMES, "n1", "v2"))


def test_plain_ack_outcome_matches_the_connection_task() -> None:
    conn = _sotw_conn()
    req = _sotw(NAMES, "n1", "v2")
    assert conn.is_plain_ack(req)
    out = conn.on_sotw_request(req)
    assert out.kind is Kind.ACK and out.reply is None and out.dirty is None
    w = conn.watched[EDS]
    assert (w.nonce_acked, w.version_acked, w.awaiting_ack) == ("n1", "v2", False)


def _delta(**kw: Any) -> discovery_pb2.DeltaDiscoveryRequest:
    return discovery_pb2.DeltaDiscoveryRequest(type_url=EDS, **kw)


@pytest.mark.parametrize("case", ["plain", "nack", "stale", "subscribe", "unsubscribe", "dirty"])
def test_delta_plain_ack(case: str) -> None:
    conn = Connection("c-1", Proxy.from_node(node()), delta=True)
    assert conn.on_delta_request(_delta(resource_names_subscribe=NAMES)).kind is Kind.INIT
    w = conn.watched[EDS]
    w.nonce_sent, w.awaiting_ack = "n1", True
    req = {
        "plain": _delta(response_nonce="n1"),
        "nack": _delta(response_nonce="n1", error_detail=status_pb2.Status(message="x")),
        "stale": _delta(response_nonce="n0"),
        "subscribe": _delta(response_nonce="n1", resource_names_subscribe=["z"]),
        "unsubscribe": _delta(response_nonce="n1", resource_names_unsubscribe=[NAMES[0]]),
        "dirty": _delta(response_nonce="n1"),
    }[case]
    if case == "dirty":
        w.dirty = PushRequest(full=False, eds_hosts=frozenset({"x"}))
    assert conn.is_plain_ack(req) is (case == "plain")


def test_delta_unsubscribe_still_forgets_versions() -> None:
    conn = Connection("c-1", Proxy.from_node(node()), delta=True)
    conn.on_delta_request(_delta(resource_names_subscribe=["a", "b"]))
    w = conn.watched[EDS]
    w.versions = {"a": "1", "b": "1"}
    w.nonce_sent, w.awaiting_ack = "n1", True
    conn.on_delta_request(_delta(response_nonce="n1"))
    assert w.versions == {"a": "1", "b": "1"}
    conn.on_delta_request(_delta(resource_names_unsubscribe=["a"]))
    assert w.versions == {"b": "1"}


async def test_connection_is_idle_only_when_parked_with_nothing_queued() -> None:
    conn = Connection("c-1", Proxy.from_node(node()), delta=False)
    assert not conn.idle  # the task has not reached next_event yet
    task = asyncio.create_task(conn.next_event())
    await eventually(lambda: conn.idle)
    conn.enqueue_push(PushRequest(full=False), FakeContext("v2"))
    assert not conn.idle  # a push is pending: requests go through the task
    assert isinstance(await task, PendingPush)
    assert not conn.idle  # running: not parked
    task = asyncio.create_task(conn.next_event())
    await eventually(lambda: conn.idle)
    await conn.put_request(_sotw(NAMES))
    assert not conn.idle
    assert await task is not None
    conn.close_input()
    assert await conn.next_event() is None
    assert not conn.idle


class _Counting:
    """Counts requests that reach the connection task."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.requests: list[Any] = []
        original = DiscoveryServer._handle_request

        async def handle(server: DiscoveryServer, writer: Any, req: Any) -> None:
            self.requests.append(req)
            await original(server, writer, req)

        monkeypatch.setattr(DiscoveryServer, "_handle_request", handle)


async def test_endpoint_push_ack_skips_the_connection_task(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _Counting(monkeypatch)
    c = harness.sotw()
    await subscribe(c, CDS)
    await subscribe(c, EDS, ("a", "b", "c"))
    await harness.settled()
    harness.gen.put(EDS, "b", tag="2")
    before = sample("pilot_proxy_convergence_time_count")
    harness.push(full=False, eds_hosts={"b"})
    resp = await c.recv()
    assert names_of(resp) == ["b"]
    counting.requests.clear()
    c.ack(resp, ["a", "b", "c"])
    await harness.settled()
    await c.expect_nothing()
    assert counting.requests == []  # handled by the reader
    st = harness.status()
    assert st["endpoint_acked"] == resp.nonce
    assert sample("pilot_proxy_convergence_time_count") == before + 1
    # A later NACK still goes to the connection task, and nothing is resent.
    harness.gen.put(EDS, "b", tag="3")
    harness.push(full=False, eds_hosts={"b"})
    bad = await c.recv()
    c.nack(bad, "rejected", ["a", "b", "c"])
    await c.expect_nothing()
    assert [r.response_nonce for r in counting.requests] == [bad.nonce]
    assert harness.status()["endpoint_nack"] == "rejected"


async def test_ack_releasing_a_coalesced_push_still_sends_it(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _Counting(monkeypatch)
    c = harness.sotw()
    await subscribe(c, EDS, ("a",))
    await harness.settled()
    harness.gen.put(EDS, "a", tag="2")
    harness.push(full=False, eds_hosts={"a"})
    r2 = await c.recv()
    harness.gen.put(EDS, "a", tag="3")
    harness.push(full=False, eds_hosts={"a"})
    harness.gen.put(EDS, "a", tag="4")
    v4 = harness.push(full=False, eds_hosts={"a"})
    await c.expect_nothing()  # one un-ACKed push per type
    counting.requests.clear()
    c.ack(r2, ["a"])
    r4 = await c.recv()
    assert tags_of(r4)["a"] == "4" and r4.version_info == v4
    assert [r.response_nonce for r in counting.requests] == [r2.nonce]
    c.ack(r4, ["a"])
    await harness.settled()
    await c.expect_nothing()
    assert harness.status()["endpoint_acked"] == r4.nonce


async def test_changed_names_in_an_ack_are_answered(harness: Harness) -> None:
    c = harness.sotw()
    await subscribe(c, EDS, ("a",))
    harness.gen.put(EDS, "a", tag="2")
    harness.push(full=False, eds_hosts={"a"})
    r2 = await c.recv()
    c.ack(r2, ["a", "c"])
    assert names_of(await c.recv()) == ["c"]


async def test_delta_endpoint_push_ack_skips_the_connection_task(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    counting = _Counting(monkeypatch)
    c = harness.delta()
    c.request(EDS, ["a", "b"])
    first = await c.recv()
    c.ack(first)
    await harness.settled()
    harness.gen.put(EDS, "a", tag="2")
    harness.push(full=False, eds_hosts={"a"})
    resp = await c.recv()
    assert [r.name for r in resp.resources] == ["a"]
    counting.requests.clear()
    c.ack(resp)
    await harness.settled()
    await c.expect_nothing()
    assert counting.requests == []
    w = harness.discovery.connections[0].watched[typeurls.ENDPOINT]
    assert w.nonce_acked == resp.nonce and w.versions.keys() == {"a", "b"}


def test_delta_explicit_resubscribe_forgets_the_version_without_unsubscribe() -> None:
    # Envoy re-subscribes warming clusters' endpoints: the answer must carry them
    # even though the client was sent this version already.
    conn = Connection("c-1", Proxy.from_node(node()), delta=True)
    conn.on_delta_request(_delta(resource_names_subscribe=["a", "b"]))
    w = conn.watched[EDS]
    w.versions = {"a": "1", "b": "1"}
    w.nonce_sent, w.awaiting_ack = "n1", True
    out = conn.on_delta_request(_delta(response_nonce="n1", resource_names_subscribe=["a"]))
    assert out.reply is not None and out.reply.scope == frozenset({"a"})
    assert w.versions == {"b": "1"}


def test_delta_ack_keeps_the_interned_subscription() -> None:
    interner = Interner()
    conn = Connection("c-1", Proxy.from_node(node()), delta=True, interner=interner)
    conn.on_delta_request(_delta(resource_names_subscribe=NAMES))
    w = conn.watched[EDS]
    before = w.names
    w.nonce_sent, w.awaiting_ack = "n1", True
    conn.on_delta_request(_delta(response_nonce="n1"))
    assert w.names is before
    other = Connection("c-2", Proxy.from_node(node()), delta=True, interner=interner)
    other.on_delta_request(_delta(resource_names_subscribe=list(reversed(NAMES))))
    assert other.watched[EDS].names is before
