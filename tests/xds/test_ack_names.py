"""SotW ACKs repeat every subscribed name: the raw-bytes comparison must still see any
change, including a name swapped for another of the same length."""

from __future__ import annotations

from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.model.proxy import Proxy
from meshpilot.xds import typeurls
from meshpilot.xds.connection import Connection, Kind
from meshpilot.xds.wire import SotwRequest
from tests.xds.client import node


def _raw(
    names: list[str], nonce: str = "", version: str = "", with_node: bool = False
) -> SotwRequest:
    msg = discovery_pb2.DiscoveryRequest(
        type_url=typeurls.ENDPOINT, resource_names=names, response_nonce=nonce, version_info=version
    )
    if with_node:
        msg.node.CopyFrom(node())
    return SotwRequest.parse(msg.SerializeToString())


def test_same_length_name_change_in_an_ack_is_seen() -> None:
    conn = Connection("c-1", Proxy.from_node(node()), delta=False)
    names = [f"outbound|9080||svc{i}.default.svc.cluster.local" for i in range(100)]
    assert conn.on_sotw_request(_raw(names, with_node=True)).kind is Kind.INIT
    w = conn.watched[typeurls.ENDPOINT]
    for round_ in range(3):
        w.nonce_sent, w.awaiting_ack = f"n{round_}", True
        out = conn.on_sotw_request(_raw(names, nonce=f"n{round_}", version="v1"))
        assert out.kind is Kind.ACK and not out.added and not out.removed
    changed = [*names[:50], "outbound|9080||svcX.default.svc.cluster.local", *names[51:]]
    w.nonce_sent, w.awaiting_ack = "n9", True
    out = conn.on_sotw_request(_raw(changed, nonce="n9", version="v1"))
    assert out.added == frozenset({"outbound|9080||svcX.default.svc.cluster.local"})
    assert out.removed == frozenset({names[50]})
    assert w.names == frozenset(changed)
