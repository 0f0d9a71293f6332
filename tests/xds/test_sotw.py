"""State-of-the-world ADS: subscribe, ACK, NACK, stale nonces, backpressure, order."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from meshpilot.model.push_request import PushRequest
from meshpilot.xds.resources import Generated
from meshpilot.xds.server import DiscoveryServer
from tests.xds.client import SotwClient, names_of, tags_of
from tests.xds.conftest import CDS, EDS, LDS, RDS, Harness, sample, start_harness
from tests.xds.fake_generator import FakeContext, FakeGenerator


async def subscribe(
    c: SotwClient, type_url: str, names: tuple[str, ...] = ()
) -> tuple[object, list[str]]:
    """Initial request and its ACK; returns the response and the names in it."""
    c.request(type_url, names)
    resp = await c.recv()
    c.ack(resp, names)
    return resp, names_of(resp)


async def test_initial_wildcard_cds_and_lds_get_complete_sets(harness: Harness) -> None:
    c = harness.sotw()
    c.request(CDS)
    cds = await c.recv()
    assert cds.type_url == CDS
    assert cds.version_info == "v1"
    assert cds.nonce
    assert names_of(cds) == ["a", "b", "c"]
    c.request(LDS)
    lds = await c.recv()
    assert names_of(lds) == ["l1", "l2"]
    assert lds.nonce != cds.nonce
    assert cds.control_plane.identifier == harness.discovery.instance_id


async def test_initial_named_eds_and_rds_get_requested_names_only(harness: Harness) -> None:
    c = harness.sotw()
    c.request(EDS, ["a", "c"])
    assert names_of(await c.recv()) == ["a", "c"]
    c.request(RDS, ["r2"])
    assert names_of(await c.recv()) == ["r2"]


async def test_missing_names_do_not_hold_back_the_answer(harness: Harness) -> None:
    c = harness.sotw()
    c.request(EDS, ["a", "not-yet"])
    assert names_of(await c.recv()) == ["a"]


async def test_reconnect_with_another_servers_nonce_gets_a_full_answer(harness: Harness) -> None:
    c = harness.sotw()
    c.request(CDS, nonce="nonce-from-the-previous-server", version="v0")
    resp = await c.recv()
    assert names_of(resp) == ["a", "b", "c"]
    c.request(EDS, ["b"], nonce="nonce-from-the-previous-server", version="v0")
    assert names_of(await c.recv()) == ["b"]


async def test_ack_sends_nothing_and_is_recorded(harness: Harness) -> None:
    c = harness.sotw()
    c.request(CDS)
    resp = await c.recv()
    c.ack(resp)
    await c.expect_nothing()
    st = harness.status()
    assert st["cluster_sent"] == resp.nonce
    assert st["cluster_acked"] == resp.nonce
    assert st["cluster_nack"] == ""
    w = harness.discovery.connections[0].watched[CDS]
    assert w.version_acked == "v1"
    assert not w.awaiting_ack


async def test_nack_is_recorded_counted_and_not_resent(harness: Harness) -> None:
    c = harness.sotw()
    first, _ = await subscribe(c, CDS)
    harness.gen.put(CDS, "b", tag="bad")
    harness.push()
    bad = await c.recv()
    assert tags_of(bad)["b"] == "bad"
    before = sample("pilot_total_xds_rejects_total", type="cds")
    c.nack(bad, "cluster b: invalid thing", version=first.version_info)
    await c.expect_nothing()
    assert sample("pilot_total_xds_rejects_total", type="cds") == before + 1
    st = harness.status()
    assert st["cluster_nack"] == "cluster b: invalid thing"
    assert st["cluster_sent"] == bad.nonce
    assert st["cluster_acked"] == first.nonce

    # A push that leaves this proxy's clusters as they are must not resend them.
    harness.push()
    await c.expect_nothing()

    # Changed config goes out, and its ACK clears the NACK state.
    harness.gen.put(CDS, "b", tag="fixed")
    harness.push()
    fixed = await c.recv()
    assert tags_of(fixed)["b"] == "fixed"
    c.ack(fixed)
    await c.expect_nothing()
    assert harness.status()["cluster_nack"] == ""
    assert harness.status()["cluster_acked"] == fixed.nonce


async def test_nack_releases_a_coalesced_push(harness: Harness) -> None:
    c = harness.sotw()
    await subscribe(c, CDS)
    harness.gen.put(CDS, "a", tag="bad")
    harness.push()
    bad = await c.recv()
    harness.gen.put(CDS, "a", tag="good")
    harness.push()
    await c.expect_nothing()  # waiting for the ACK/NACK of `bad`
    c.nack(bad, "rejected")
    good = await c.recv()
    assert tags_of(good)["a"] == "good"


async def test_stale_nonce_is_ignored(harness: Harness) -> None:
    c = harness.sotw()
    e1, _ = await subscribe(c, EDS, ("a",))
    harness.gen.put(EDS, "a", tag="2")
    harness.push()
    e2 = await c.recv()
    before = sample("pilot_xds_expired_nonce_total", type="eds")
    # A request carrying the older nonce, even with new names, is stale.
    c.request(EDS, ["a", "b"], nonce=e1.nonce, version=e1.version_info)
    await c.expect_nothing()
    assert sample("pilot_xds_expired_nonce_total", type="eds") == before + 1
    w = harness.discovery.connections[0].watched[EDS]
    assert w.names == frozenset({"a"})
    assert w.awaiting_ack
    # The real ACK (with the new names) is answered with the newly subscribed one only.
    c.ack(e2, ["a", "b"])
    assert names_of(await c.recv()) == ["b"]


async def test_new_names_answered_even_with_unchanged_version(harness: Harness) -> None:
    c = harness.sotw()
    e1, _ = await subscribe(c, EDS, ("a",))
    await c.expect_nothing()
    c.request(EDS, ["a", "b", "c"], nonce=e1.nonce, version=e1.version_info)
    resp = await c.recv()
    assert resp.version_info == e1.version_info == "v1"
    assert names_of(resp) == ["b", "c"]
    assert resp.nonce != e1.nonce


async def test_unsubscribe_updates_names_and_sends_nothing(harness: Harness) -> None:
    c = harness.sotw()
    e1, _ = await subscribe(c, EDS, ("a", "b"))
    c.request(EDS, ["a"], nonce=e1.nonce, version=e1.version_info)
    await c.expect_nothing()
    assert harness.discovery.connections[0].watched[EDS].names == frozenset({"a"})
    # Endpoint change of the dropped name: nothing for this proxy.
    harness.gen.put(EDS, "b", tag="2")
    harness.push(full=False, eds_hosts={"b"})
    await c.expect_nothing()
    harness.gen.put(EDS, "a", tag="2")
    harness.push(full=False, eds_hosts={"a", "b"})
    resp = await c.recv()
    assert names_of(resp) == ["a"]


async def test_backpressure_coalesces_pushes_until_ack(harness: Harness) -> None:
    c = harness.sotw()
    await subscribe(c, CDS)
    harness.gen.put(CDS, "a", tag="2")
    harness.push()
    r2 = await c.recv()
    assert tags_of(r2)["a"] == "2"
    harness.gen.put(CDS, "a", tag="3")
    harness.push()
    harness.gen.put(CDS, "a", tag="4")
    v4 = harness.push()
    await c.expect_nothing()
    c.ack(r2)
    r4 = await c.recv()
    assert tags_of(r4)["a"] == "4"
    assert r4.version_info == v4
    c.ack(r4)
    await c.expect_nothing()


async def test_full_push_sends_types_in_push_order(harness: Harness) -> None:
    c = harness.sotw()
    for type_url, names in ((LDS, ()), (RDS, ("r1",)), (CDS, ()), (EDS, ("a",))):
        await subscribe(c, type_url, names)
    await c.expect_nothing()
    for type_url, name in ((LDS, "l1"), (RDS, "r1"), (CDS, "a"), (EDS, "a")):
        harness.gen.put(type_url, name, tag="2")
    harness.push()
    got = await c.recv_many(4)
    assert [r.type_url for r in got] == [CDS, EDS, LDS, RDS]
    assert sample("pilot_xds_pushes_total", type="rds") >= 2


async def test_cds_change_is_followed_by_eds_for_warming_clusters(harness: Harness) -> None:
    c = harness.sotw()
    await subscribe(c, CDS)
    e1, _ = await subscribe(c, EDS, ("a", "b"))
    await harness.settled()
    harness.gen.put(CDS, "a", tag="2")  # cluster changed, endpoints did not
    harness.push()
    cds, eds = await c.recv_many(2)
    assert cds.type_url == CDS
    assert eds.type_url == EDS
    assert names_of(eds) == ["a", "b"]
    # Envoy's warming re-request still carries the older EDS nonce: stale, ignored.
    c.ack(cds)
    c.request(EDS, ["a", "b"], nonce=e1.nonce, version=e1.version_info)
    c.ack(eds, ["a", "b"])
    await c.expect_nothing()


async def test_eds_rerequest_after_cds_push_is_answered(harness: Harness) -> None:
    c = harness.sotw()
    await subscribe(c, CDS)
    e1, _ = await subscribe(c, EDS, ("a", "b"))
    await harness.settled()
    harness.gen.unchanged_on_push.add(EDS)
    harness.gen.put(CDS, "a", tag="2")
    harness.push()
    cds = await c.recv()
    assert cds.type_url == CDS
    await c.expect_nothing()  # nothing new for EDS in this push
    # Envoy re-requests EDS for the warming cluster: same names, same nonce as the ACK.
    c.ack(cds)
    c.request(EDS, ["a", "b"], nonce=e1.nonce, version=e1.version_info)
    eds = await c.recv()
    assert eds.type_url == EDS
    assert names_of(eds) == ["a", "b"]
    c.ack(eds, ["a", "b"])
    await c.expect_nothing()


async def test_endpoint_only_push_sends_only_changed_eds(harness: Harness) -> None:
    c = harness.sotw()
    await subscribe(c, CDS)
    await subscribe(c, LDS)
    await subscribe(c, EDS, ("a", "b", "c"))
    await c.expect_nothing()
    harness.gen.calls.clear()
    harness.gen.put(EDS, "b", tag="2")
    harness.push(full=False, eds_hosts={"b"})
    resp = await c.recv()
    assert resp.type_url == EDS
    assert names_of(resp) == ["b"]
    assert {call.type_url for call in harness.gen.calls} == {EDS}
    await c.expect_nothing()


async def test_bad_node_id_is_rejected_and_others_keep_working(harness: Harness) -> None:
    bad = harness.sotw(node_id="not-an-istio-node")
    bad.request(CDS)
    err = await bad.error()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not-an-istio-node" in (err.details() or "")

    good = harness.sotw()
    good.request(CDS)
    assert names_of(await good.recv()) == ["a", "b", "c"]


async def test_missing_node_on_first_request_is_rejected(harness: Harness) -> None:
    c = harness.sotw()
    c.request(CDS, with_node=False)
    err = await c.error()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "node" in (err.details() or "")


async def test_later_requests_may_omit_node(harness: Harness) -> None:
    c = harness.sotw()
    c.request(CDS)
    await c.recv()
    c.request(LDS, with_node=False)
    assert names_of(await c.recv()) == ["l1", "l2"]


async def test_unknown_type_is_ignored(harness: Harness) -> None:
    c = harness.sotw()
    c.request("type.googleapis.com/some.Unknown")
    await c.expect_nothing()
    c.request(CDS)
    assert names_of(await c.recv()) == ["a", "b", "c"]


async def test_generator_failure_does_not_end_the_stream(harness: Harness) -> None:
    c = harness.sotw()
    await subscribe(c, CDS)
    await subscribe(c, LDS)
    harness.gen.fail_for.add(CDS)
    harness.gen.put(LDS, "l1", tag="2")
    harness.push()
    assert (await c.recv()).type_url == LDS


async def test_requests_wait_for_the_first_push_context() -> None:
    gen = FakeGenerator()
    gen.put(CDS, "x")
    server, h = await start_harness(gen, context=None)
    try:
        c = h.sotw()
        c.request(CDS)
        await c.expect_nothing()  # an empty CDS now would wipe a reconnecting Envoy
        h.discovery.push(PushRequest(), FakeContext("v7"))
        resp = await c.recv()
        assert resp.version_info == "v7"
        assert names_of(resp) == ["x"]
        await c.close()
    finally:
        await h.channel.close()
        await server.stop(0)


async def test_same_proxy_may_connect_twice(harness: Harness) -> None:
    c1, c2 = harness.sotw(), harness.sotw()
    c1.request(CDS)
    c2.request(CDS)
    r1, r2 = await c1.recv(), await c2.recv()
    assert r1.nonce != r2.nonce
    conns = harness.discovery.connections_for(c1.node_id)
    assert len(conns) == 2
    assert len({conn.conn_id for conn in conns}) == 2
    assert all(conn.conn_id.startswith(c1.node_id + "-") for conn in conns)
    await c1.close()
    for _ in range(50):
        if len(harness.discovery.connections) == 1:
            break
        await asyncio.sleep(0.02)
    assert len(harness.discovery.connections) == 1


async def test_sync_status_and_sent_resources(harness: Harness) -> None:
    c = harness.sotw()
    cds, _ = await subscribe(c, CDS)
    eds, _ = await subscribe(c, EDS, ("a",))
    await c.expect_nothing()
    st = harness.status()
    assert st["proxy"] == c.node_id
    assert st["proxy_type"] == "sidecar"
    assert st["istio_version"] == "1.24.0"
    assert st["delta"] is False
    assert st["conn_id"].startswith(c.node_id)
    assert (st["cluster_sent"], st["cluster_acked"]) == (cds.nonce, cds.nonce)
    assert (st["endpoint_sent"], st["endpoint_acked"]) == (eds.nonce, eds.nonce)
    assert st["listener_sent"] == st["route_sent"] == ""
    conn = harness.discovery.connections_for(c.node_id)[0]
    assert sorted(conn.sent_resources(CDS)) == ["a", "b", "c"]
    assert conn.sent_resources(CDS)["a"] is harness.gen.resources[CDS]["a"]
    assert list(conn.sent_resources(EDS)) == ["a"]
    assert conn.proxy.namespace == "default"


async def test_clients_gauge_and_convergence_metric(harness: Harness) -> None:
    before_conv = sample("pilot_proxy_convergence_time_count")
    c = harness.sotw()
    await subscribe(c, CDS)
    await c.expect_nothing()
    assert sample("pilot_xds", version="1.24.0") >= 1
    harness.gen.put(CDS, "a", tag="2")
    harness.push()
    c.ack(await c.recv())
    await c.expect_nothing()
    assert sample("pilot_proxy_convergence_time_count") == before_conv + 1


async def test_nonces_are_distinct_across_server_instances() -> None:
    # Two instances stand for a restart: a reconnecting Envoy's old nonce must not match.
    first, second = DiscoveryServer(FakeGenerator()), DiscoveryServer(FakeGenerator())
    assert first._next_nonce() != second._next_nonce()
    assert first.instance_id != second.instance_id


async def test_shared_generated_output_is_encoded_once_per_push(harness: Harness) -> None:
    shared = Generated(tuple(harness.gen.resources[CDS][n] for n in ("a", "b", "c")))
    real = harness.gen.generate

    def generate(type_url: str, *args: Any) -> Generated | None:
        return shared if type_url == CDS else real(type_url, *args)

    harness.gen.generate = generate  # type: ignore[method-assign]
    encoder = harness.discovery._encoder
    misses = encoder.misses
    ids = [f"sidecar~10.1.0.{i}~p{i}.default~default.svc.cluster.local" for i in range(3)]
    clients = [harness.sotw(node_id) for node_id in ids]
    for c in clients:
        c.request(CDS)
    responses = [await c.recv() for c in clients]
    assert encoder.misses == misses + 1
    assert len({r.nonce for r in responses}) == 3
    assert all(names_of(r) == ["a", "b", "c"] for r in responses)
    assert all(r.version_info == "v1" for r in responses)
