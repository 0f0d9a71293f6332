"""The benchmark client's per-process decode cache: proxies of different scopes get
their own names even when their responses have the same type, version and size."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import discovery_pb2

from bench import wire
from bench.client import Shared
from meshpilot.xds import typeurls


def _cds(nonce: str, *hosts: str) -> bytes:
    resp = discovery_pb2.DiscoveryResponse(
        version_info="2026-12-04T18:00:00Z/7", type_url=typeurls.CLUSTER, nonce=nonce
    )
    for host in hosts:
        cluster = cluster_pb2.Cluster(name=f"outbound|9080||{host}", type=cluster_pb2.Cluster.EDS)
        resp.resources.add().Pack(cluster)
    return resp.SerializeToString()


def test_equal_sized_cds_answers_of_two_scopes_give_each_its_own_eds_names() -> None:
    # What two namespaces with Sidecars get: each its own services, names of one length.
    ns1 = _cds("n-1", "svc-1.ns-1.svc.cluster.local", "svc-11.ns-1.svc.cluster.local")
    ns2 = _cds("n-2", "svc-2.ns-2.svc.cluster.local", "svc-12.ns-2.svc.cluster.local")
    assert len(ns1) == len(ns2)
    shared = Shared(delta=False)

    names1, _ = shared.names_of(ns1, wire.envelope(ns1))
    names2, _ = shared.names_of(ns2, wire.envelope(ns2))

    assert names1 == (
        "outbound|9080||svc-1.ns-1.svc.cluster.local",
        "outbound|9080||svc-11.ns-1.svc.cluster.local",
    )
    assert names2 == (
        "outbound|9080||svc-2.ns-2.svc.cluster.local",
        "outbound|9080||svc-12.ns-2.svc.cluster.local",
    )


def test_one_shared_message_is_decoded_once() -> None:
    data = _cds("n-1", "svc-1.ns-1.svc.cluster.local")
    shared = Shared(delta=False)
    first = shared.names_of(data, wire.envelope(data))
    again = shared.names_of(bytes(data), wire.envelope(data))
    assert again == first
    assert shared.decoded == 1


def test_resource_counts_are_per_message() -> None:
    one = _cds("n-1", "svc-123.ns-1.svc.cluster.local")
    two = _cds("n-2", "svc-1.ns-1.svc.cluster.local", "svc-2.ns-1.svc.cluster.local")
    shared = Shared(delta=False)
    assert shared.count(one, wire.envelope(one)) == 1
    assert shared.count(two, wire.envelope(two)) == 2
