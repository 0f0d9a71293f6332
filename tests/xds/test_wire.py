"""xds/wire.py against protobuf: the hand-assembled responses are byte-for-byte what
SerializeToString() gives for the same DiscoveryResponse / DeltaDiscoveryResponse."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.xds import typeurls, wire
from meshpilot.xds.resources import Resource
from tests.xds.fake_generator import make_message

IDENTIFIER = "istiod-7f9c-a1b2c3"
CONTROL_PLANE = base_pb2.ControlPlane(identifier=IDENTIFIER)


def _resources(type_url: str, n: int) -> tuple[Resource, ...]:
    return tuple(
        Resource.of(f"name-{i}", make_message(type_url, f"name-{i}", f"tag-{i}"), type_url)
        for i in range(n)
    )


CASES = [
    pytest.param(typeurls.CLUSTER, 0, "", "", id="empty-no-version-no-nonce"),
    pytest.param(typeurls.CLUSTER, 0, "2026-12-04T17:00:00Z/3", "a1b2-1", id="empty"),
    pytest.param(typeurls.ENDPOINT, 1, "v1", "n", id="one"),
    pytest.param(typeurls.LISTENER, 50, "v-ünïcode", "0f3e9c2a-123456789", id="many"),
    pytest.param(typeurls.ROUTE, 3, "x" * 300, "n" * 200, id="long-strings"),
]


@pytest.mark.parametrize(("type_url", "count", "version", "nonce"), CASES)
@pytest.mark.parametrize("cached", [True, False], ids=["encoder-cache", "no-cache"])
def test_sotw_response_bytes_equal_protobuf(
    type_url: str, count: int, version: str, nonce: str, cached: bool
) -> None:
    resources = _resources(type_url, count)
    encoder = wire.Encoder()
    for _ in range(2):  # the second round is served from the encoder's caches
        block = encoder.block(resources, False, cached)
        ours = wire.sotw_response(
            version, type_url, nonce, CONTROL_PLANE.SerializeToString(), block
        )
        theirs = discovery_pb2.DiscoveryResponse(
            version_info=version,
            resources=[r.body for r in resources],
            type_url=type_url,
            nonce=nonce,
            control_plane=CONTROL_PLANE,
        ).SerializeToString()
        assert ours == theirs


@pytest.mark.parametrize(("type_url", "count", "version", "nonce"), CASES)
@pytest.mark.parametrize(
    "removed", [(), ("gone",), ("a", "b", "", "outbound|9080||x.ns.svc")], ids=["0", "1", "3"]
)
@pytest.mark.parametrize("framing", ["block", "entries"])
def test_delta_response_bytes_equal_protobuf(
    type_url: str, count: int, version: str, nonce: str, removed: tuple[str, ...], framing: str
) -> None:
    resources = _resources(type_url, count)
    encoder = wire.Encoder()
    if framing == "block":
        block = encoder.block(resources, True)
    else:
        block = b"".join(encoder.entry(r, True) for r in resources)
    ours = wire.delta_response(
        version, type_url, nonce, removed, CONTROL_PLANE.SerializeToString(), block
    )
    msg = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=version,
        type_url=type_url,
        nonce=nonce,
        removed_resources=list(removed),
        control_plane=CONTROL_PLANE,
    )
    for r in resources:
        msg.resources.add(name=r.name, version=r.version, resource=r.body)
    assert ours == msg.SerializeToString()


def test_a_server_response_parses_back_to_the_same_message() -> None:
    # The assembled bytes are a valid message with every field where protobuf puts it.
    resources = _resources(typeurls.CLUSTER, 2)
    data = wire.sotw_response(
        "v9",
        typeurls.CLUSTER,
        "n-1",
        CONTROL_PLANE.SerializeToString(),
        wire.Encoder().block(resources, False),
    )
    msg = discovery_pb2.DiscoveryResponse.FromString(data)
    assert msg.version_info == "v9" and msg.nonce == "n-1"
    assert msg.control_plane.identifier == IDENTIFIER
    assert [a.value for a in msg.resources] == [r.body.value for r in resources]
