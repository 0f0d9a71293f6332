"""Delta pushes to the streams of one scope: the diff is computed once, not per stream."""

from __future__ import annotations

import itertools

from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.xds import typeurls, wire
from meshpilot.xds.delta import DeltaResponses
from meshpilot.xds.resources import Generated, Joined, Resource
from meshpilot.xds.watched import WatchedResource

CDS = typeurls.CLUSTER


def _resources(names: list[str], tag: str = "1") -> tuple[Resource, ...]:
    return tuple(Resource.of_bytes(n, f"{n}:{tag}".encode(), CDS) for n in names)


def _responses() -> DeltaResponses:
    counter = itertools.count(1)
    return DeltaResponses(wire.Encoder(), lambda: f"n{next(counter)}", "test")


def _stream() -> WatchedResource:
    # A fresh wildcard CDS subscription without initial versions.
    return WatchedResource(CDS, wildcard=True, delta_base=())


def _decode(data: bytes | None) -> tuple[dict[str, bytes], list[str]]:
    assert data is not None
    resp = discovery_pb2.DeltaDiscoveryResponse.FromString(data)
    return {r.name: r.resource.value for r in resp.resources}, list(resp.removed_resources)


def _push(
    responses: DeltaResponses, streams: list[WatchedResource], gen: Generated, version: str
) -> list[tuple[dict[str, bytes], list[str]]]:
    return [_decode(responses.build({CDS: w}, w, gen, version, None, False)) for w in streams]


def test_streams_of_a_scope_share_one_diff_per_push() -> None:
    responses = _responses()
    streams = [_stream() for _ in range(5)]
    names = [f"outbound|80||svc{i}.ns.svc.cluster.local" for i in range(100)]
    first = _resources(names)
    out = _push(responses, streams, Generated(first), "v1")
    assert responses.diffs_computed == 1
    assert all(o == out[0] for o in out)
    assert set(out[0][0]) == set(names) and out[0][1] == []

    # One changed, one gone, one new: every stream gets exactly that, from one diff.
    second = (
        *_resources(names[:1], "2"),
        *first[1:99],
        *_resources(["outbound|80||new.ns.svc.cluster.local"]),
    )
    out = _push(responses, streams, Generated(second), "v2")
    assert responses.diffs_computed == 2
    for changed, removed in out:
        assert set(changed) == {names[0], "outbound|80||new.ns.svc.cluster.local"}
        assert removed == [names[99]]
    for w in streams:
        assert w.versions == {r.name: r.version for r in second}

    # Nothing new: nothing sent, and nothing recomputed for the streams.
    assert all(
        responses.build({CDS: w}, w, Generated(second), "v3", None, False) is None for w in streams
    )
    assert responses.diffs_computed == 3


def test_own_parts_are_diffed_per_stream_and_the_shared_part_once() -> None:
    responses = _responses()
    streams = [_stream() for _ in range(4)]
    outbound = _resources([f"outbound|80||svc{i}.ns.svc.cluster.local" for i in range(50)])

    def answer(i: int, shared: tuple[Resource, ...], tag: str) -> Generated:
        own = _resources(["BlackHoleCluster", f"inbound|{8000 + i}||"], tag)
        return Generated(Joined((own, shared), (False, True)), shared=False)

    out = [
        _decode(responses.build({CDS: w}, w, answer(i, outbound, "1"), "v1", None, False))
        for i, w in enumerate(streams)
    ]
    assert responses.diffs_computed == 1
    assert all(len(changed) == 52 for changed, _ in out)
    updated = (*outbound[:49], *_resources([outbound[49].name], "2"))
    out = [
        _decode(responses.build({CDS: w}, w, answer(i, updated, "1"), "v2", None, False))
        for i, w in enumerate(streams)
    ]
    assert responses.diffs_computed == 2
    assert all(set(changed) == {outbound[49].name} and not removed for changed, removed in out)


def test_shared_diff_sends_what_the_per_stream_diff_sends() -> None:
    names = [f"outbound|80||svc{i}.ns.svc.cluster.local" for i in range(20)]
    first, second = _resources(names), (*_resources(names[5:], "2"), *_resources(["x"]))
    shared, plain = _responses(), _responses()
    a, b = _stream(), WatchedResource(CDS, wildcard=True)  # b: state unknown, diffed alone
    for gen, version in ((Generated(first), "v1"), (Generated(second), "v2")):
        got_a = _decode(shared.build({CDS: a}, a, gen, version, None, False))
        got_b = _decode(plain.build({CDS: b}, b, gen, version, None, False))
        assert got_a == got_b
    assert plain.diffs_computed == 1  # b was first diffed alone; then it was known
    assert a.versions == b.versions
