"""Delta ADS: changed resources only, removals, reconnect with initial versions."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from tests.xds.client import DeltaClient, delta_names
from tests.xds.conftest import CDS, EDS, LDS, Harness, sample
from tests.xds.fake_generator import decode


def versions_of(resp: discovery_pb2.DeltaDiscoveryResponse) -> dict[str, str]:
    return {r.name: r.version for r in resp.resources}


def tag(resp: discovery_pb2.DeltaDiscoveryResponse, name: str) -> str:
    (r,) = [r for r in resp.resources if r.name == name]
    assert decode(r.resource)[0] == name
    return decode(r.resource)[1]


async def subscribe(
    c: DeltaClient, type_url: str, names: tuple[str, ...] = ()
) -> discovery_pb2.DeltaDiscoveryResponse:
    c.request(type_url, names)
    resp = await c.recv()
    c.ack(resp)
    return resp


async def test_empty_initial_subscribe_is_wildcard_for_cds(harness: Harness) -> None:
    c = harness.delta()
    c.request(CDS)
    resp = await c.recv()
    assert resp.type_url == CDS
    assert resp.system_version_info == "v1"
    assert resp.nonce
    assert delta_names(resp) == ["a", "b", "c"]
    gen = harness.gen.resources[CDS]
    assert versions_of(resp) == {n: gen[n].version for n in ("a", "b", "c")}
    assert all(r.resource.type_url == CDS for r in resp.resources)
    assert list(resp.removed_resources) == []


async def test_star_is_wildcard_for_lds(harness: Harness) -> None:
    c = harness.delta()
    c.request(LDS, ["*"])
    assert delta_names(await c.recv()) == ["l1", "l2"]
    assert harness.discovery.connections[0].watched[LDS].wildcard


async def test_named_eds_and_ack_sends_nothing(harness: Harness) -> None:
    c = harness.delta()
    resp = await subscribe(c, EDS, ("a", "b"))
    assert delta_names(resp) == ["a", "b"]
    await c.expect_nothing()
    st = harness.status()
    assert st["delta"] is True
    assert st["endpoint_sent"] == st["endpoint_acked"] == resp.nonce


async def test_push_sends_only_changed_resources_and_removals(harness: Harness) -> None:
    c = harness.delta()
    await subscribe(c, CDS)
    harness.gen.put(CDS, "b", tag="2")
    harness.push()
    resp = await c.recv()
    assert delta_names(resp) == ["b"]
    assert tag(resp, "b") == "2"
    assert list(resp.removed_resources) == []
    c.ack(resp)
    harness.gen.delete(CDS, "c")
    harness.push()
    resp = await c.recv()
    assert delta_names(resp) == []
    assert list(resp.removed_resources) == ["c"]
    c.ack(resp)
    # A push that changes nothing for this proxy sends nothing at all.
    harness.push()
    await c.expect_nothing()


async def test_reconnect_honours_initial_resource_versions(harness: Harness) -> None:
    gen = harness.gen.resources[CDS]
    c = harness.delta()
    c.request(
        CDS,
        initial={"a": "stale-version", "b": gen["b"].version, "gone": "v0"},
    )
    resp = await c.recv()
    # `b` is already current on the client; `a` changed; `c` is new; `gone` vanished.
    assert delta_names(resp) == ["a", "c"]
    assert list(resp.removed_resources) == ["gone"]
    c.ack(resp)
    await c.expect_nothing()


async def test_reconnect_with_everything_current_still_gets_an_answer(harness: Harness) -> None:
    gen = harness.gen.resources[EDS]
    c = harness.delta()
    c.request(EDS, ["a"], initial={"a": gen["a"].version})
    resp = await c.recv()
    assert delta_names(resp) == []
    assert list(resp.removed_resources) == []


async def test_subscribe_and_unsubscribe(harness: Harness) -> None:
    c = harness.delta()
    await subscribe(c, EDS, ("a",))
    c.request(EDS, subscribe=["b"])
    resp = await c.recv()
    assert delta_names(resp) == ["b"]
    c.ack(resp)
    c.request(EDS, unsubscribe=["a"])
    await c.expect_nothing()
    assert harness.discovery.connections[0].watched[EDS].names == frozenset({"b"})
    # Changes of an unsubscribed name are not sent, nor is its deletion.
    harness.gen.put(EDS, "a", tag="2")
    harness.push(full=False, eds_hosts={"a"})
    await c.expect_nothing()
    harness.gen.delete(EDS, "a")
    harness.push()
    await c.expect_nothing()
    # Subscribing again gets it answered even though nothing changed since.
    harness.gen.put(EDS, "a", tag="3")
    c.request(EDS, subscribe=["a"])
    resp = await c.recv()
    assert delta_names(resp) == ["a"]
    assert tag(resp, "a") == "3"


async def test_no_removals_of_names_never_subscribed(harness: Harness) -> None:
    c = harness.delta()
    c.request(EDS, ["a"], initial={"a": "old", "z": "old"})
    resp = await c.recv()
    assert delta_names(resp) == ["a"]
    assert list(resp.removed_resources) == []
    c.ack(resp)
    harness.gen.delete(EDS, "b")
    harness.gen.delete(EDS, "c")
    harness.push()
    await c.expect_nothing()


async def test_subscribing_a_missing_name_is_answered_as_removed(harness: Harness) -> None:
    c = harness.delta()
    first = await subscribe(c, EDS, ("a", "missing"))
    assert delta_names(first) == ["a"]
    assert list(first.removed_resources) == ["missing"]
    c.request(EDS, subscribe=["nope"])
    resp = await c.recv()
    assert delta_names(resp) == []
    assert list(resp.removed_resources) == ["nope"]
    c.ack(resp)
    # Said once, when asked: later pushes do not repeat it.
    harness.push()
    await c.expect_nothing()


async def test_delta_nack_recorded_and_not_resent(harness: Harness) -> None:
    c = harness.delta()
    first = await subscribe(c, CDS)
    harness.gen.put(CDS, "a", tag="bad")
    harness.push()
    bad = await c.recv()
    before = sample("pilot_total_xds_rejects_total", type="cds")
    c.nack(bad, "cluster a: bad field")
    await c.expect_nothing()
    assert sample("pilot_total_xds_rejects_total", type="cds") == before + 1
    st = harness.status()
    assert st["cluster_nack"] == "cluster a: bad field"
    assert st["cluster_acked"] == first.nonce
    harness.push()
    await c.expect_nothing()
    harness.gen.put(CDS, "a", tag="good")
    harness.push()
    good = await c.recv()
    assert tag(good, "a") == "good"


async def test_stale_nonce_ack_is_ignored_but_its_subscription_applies(harness: Harness) -> None:
    c = harness.delta()
    e1 = await subscribe(c, EDS, ("a",))
    harness.gen.put(EDS, "a", tag="2")
    harness.push()
    e2 = await c.recv()
    before = sample("pilot_xds_expired_nonce_total", type="eds")
    c.request(EDS, subscribe=["b"], nonce=e1.nonce)
    resp = await c.recv()
    assert delta_names(resp) == ["b"]
    assert sample("pilot_xds_expired_nonce_total", type="eds") == before + 1
    c.ack(e2)  # now stale too: `resp` came after it
    await c.expect_nothing()
    c.ack(resp)
    await c.expect_nothing()


async def test_delta_backpressure_coalesces(harness: Harness) -> None:
    c = harness.delta()
    await subscribe(c, CDS)
    harness.gen.put(CDS, "a", tag="2")
    harness.push()
    r2 = await c.recv()
    harness.gen.put(CDS, "b", tag="3")
    harness.push()
    harness.gen.put(CDS, "c", tag="4")
    harness.push()
    await c.expect_nothing()
    c.ack(r2)
    r3 = await c.recv()
    assert delta_names(r3) == ["b", "c"]
    c.ack(r3)
    await c.expect_nothing()


async def test_delta_push_order_and_endpoint_only_push(harness: Harness) -> None:
    c = harness.delta()
    await subscribe(c, LDS)
    await subscribe(c, EDS, ("a",))
    await subscribe(c, CDS)
    await harness.settled()
    harness.gen.put(LDS, "l2", tag="2")
    harness.gen.put(EDS, "a", tag="2")
    harness.gen.put(CDS, "c", tag="2")
    harness.push()
    got = await c.recv_many(3)
    assert [r.type_url for r in got] == [CDS, EDS, LDS]
    for r in got:
        c.ack(r)
    await harness.settled()
    harness.gen.put(EDS, "a", tag="3")
    harness.gen.put(CDS, "a", tag="3")  # not sent: endpoint-only push
    harness.push(full=False, eds_hosts={"a"})
    resp = await c.recv()
    assert resp.type_url == EDS
    assert tag(resp, "a") == "3"
    await c.expect_nothing()


async def test_delta_wildcard_unsubscribe(harness: Harness) -> None:
    c = harness.delta()
    await subscribe(c, CDS)
    c.request(CDS, unsubscribe=["*"])
    await c.expect_nothing()
    harness.gen.put(CDS, "a", tag="2")
    harness.push()
    await c.expect_nothing()
    assert not harness.discovery.connections[0].watched[CDS].wildcard


async def test_cds_change_resends_endpoints_of_updated_clusters(harness: Harness) -> None:
    c = harness.delta()
    await subscribe(c, CDS)
    await subscribe(c, EDS, ("a", "b"))
    await harness.settled()
    harness.gen.put(CDS, "a", tag="2")  # cluster changed, endpoints did not
    harness.push()
    cds, eds = await c.recv_many(2)
    assert (cds.type_url, delta_names(cds)) == (CDS, ["a"])
    # Only the updated cluster's endpoints: it warms until it gets them again.
    assert (eds.type_url, delta_names(eds)) == (EDS, ["a"])
    c.ack(cds)
    c.ack(eds)
    await c.expect_nothing()
