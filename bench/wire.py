"""Just enough protobuf wire format for cheap simulated proxies.

A simulated proxy must cost far less than the control plane it measures, so it never
decodes a whole DiscoveryResponse: it reads the envelope fields (version, type URL,
nonce) and counts the resources. Requests are encoded by hand from pre-encoded parts.
Full decoding with the real protobuf classes happens once per process and config
version (`cluster_names`, `route_names`, ...) and the result is shared by all streams.

Field numbers (envoy.service.discovery.v3):
  DiscoveryRequest        version_info=1 node=2 resource_names=3 type_url=4
                          response_nonce=5 error_detail=6
  DiscoveryResponse       version_info=1 resources=2 type_url=4 nonce=5 control_plane=6
  DeltaDiscoveryRequest   node=1 type_url=2 resource_names_subscribe=3
                          resource_names_unsubscribe=4 initial_resource_versions=5
                          response_nonce=6
  DeltaDiscoveryResponse  system_version_info=1 resources=2 type_url=4 nonce=5
                          removed_resources=6 control_plane=7
  Resource (delta)        version=1 resource=2 name=3
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, struct_pb2

from meshpilot.xds.wire import field

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPES = (CLUSTER, ENDPOINT, LISTENER, ROUTE)
SHORT = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}
HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)

ADS_SOTW = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
ADS_DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


# --- encoding ------------------------------------------------------------------------


def repeated(number: int, values: Iterable[str]) -> bytes:
    return b"".join(field(number, v.encode()) for v in values)


def node_bytes(node_id: str, metadata: dict[str, Any]) -> bytes:
    meta = struct_pb2.Struct()
    meta.update(metadata)
    return base_pb2.Node(id=node_id, metadata=meta).SerializeToString()


def sotw_request(
    type_field: bytes, version: bytes, nonce: bytes, names: bytes, node: bytes = b""
) -> bytes:
    """DiscoveryRequest from pre-encoded parts (`type_field` = field(4, type_url),
    `names` = repeated(3, ...)); `node` only on a stream's first request."""
    out = field(2, node) if node else b""
    if version:
        out += field(1, version)
    out += names + type_field
    if nonce:
        out += field(5, nonce)
    return out


def delta_request(
    type_field: bytes, nonce: bytes = b"", subscribe: bytes = b"", node: bytes = b""
) -> bytes:
    """DeltaDiscoveryRequest (`type_field` = field(2, type_url), `subscribe` and
    unsubscribe parts pre-encoded as fields 3 and 4)."""
    out = field(1, node) if node else b""
    out += type_field + subscribe
    if nonce:
        out += field(6, nonce)
    return out


# --- decoding ------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    b = buf[pos]
    if b < 0x80:
        return b, pos + 1
    result = b & 0x7F
    shift = 7
    pos += 1
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _skip(buf: bytes, pos: int, wire_type: int) -> int:
    if wire_type == 2:
        length, pos = _read_varint(buf, pos)
        return pos + length
    if wire_type == 0:
        return _read_varint(buf, pos)[1]
    if wire_type == 1:
        return pos + 8
    if wire_type == 5:
        return pos + 4
    raise ValueError(f"unsupported wire type {wire_type}")


@dataclass(slots=True)
class Envelope:
    """The parts of a (Delta)DiscoveryResponse a proxy needs to ACK it."""

    version: bytes
    type_url: bytes
    nonce: bytes


def envelope(buf: bytes, delta: bool = False) -> Envelope:
    """Version, type URL and nonce; stops scanning as soon as all three are seen.

    (Field numbers are the same in both response types.) Resources are skipped by
    their length prefix, so a server that writes the envelope first costs a few
    steps, one that writes it last a walk over the top-level fields.
    """
    version = type_url = nonce = b""
    seen = 0
    pos, end = 0, len(buf)
    while pos < end and seen != 7:
        key, pos = _read_varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt != 2:
            pos = _skip(buf, pos, wt)
            continue
        length, pos = _read_varint(buf, pos)
        nxt = pos + length
        if num == 1:
            version, seen = buf[pos:nxt], seen | 1
        elif num == 4:
            type_url, seen = buf[pos:nxt], seen | 2
        elif num == 5:
            nonce, seen = buf[pos:nxt], seen | 4
        pos = nxt
    return Envelope(version, type_url, nonce)


def spans(buf: bytes, number: int) -> list[tuple[int, int]]:
    """(start, end) of every length-delimited top-level field `number`."""
    out = []
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt != 2:
            pos = _skip(buf, pos, wt)
            continue
        length, pos = _read_varint(buf, pos)
        if num == number:
            out.append((pos, pos + length))
        pos += length
    return out


def count(buf: bytes, number: int = 2) -> int:
    """How many top-level fields `number` (resources: 2) a message has."""
    n = 0
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos)
        wt = key & 7
        if wt != 2:
            pos = _skip(buf, pos, wt)
            continue
        length, pos = _read_varint(buf, pos)
        if key >> 3 == number:
            n += 1
        pos += length
    return n


def strings(buf: bytes, number: int) -> list[str]:
    return [buf[a:b].decode() for a, b in spans(buf, number)]


# --- full decoding (once per process and config version) -----------------------------


def _any_values(buf: bytes, delta: bool) -> list[tuple[str, bytes]]:
    """(name or "", Any.value) of each resource; delta Resources carry their name."""
    out = []
    for a, b in spans(buf, 2):
        if delta:
            res = buf[a:b]
            name = "".join(strings(res, 3))
            inner = spans(res, 2)
            if not inner:
                continue  # a name-only entry: the resource does not exist
            body = res[inner[0][0] : inner[0][1]]
        else:
            name, body = "", buf[a:b]
        value = any_pb2.Any.FromString(body).value
        out.append((name, value))
    return out


def eds_cluster_names(buf: bytes, delta: bool = False) -> list[str]:
    """Names to subscribe in EDS: EDS clusters' eds service name, else cluster name."""
    out = []
    for _, value in _any_values(buf, delta):
        c = cluster_pb2.Cluster.FromString(value)
        if c.HasField("type") and c.type == cluster_pb2.Cluster.EDS:
            out.append(c.eds_cluster_config.service_name or c.name)
    return out


def route_names(buf: bytes, delta: bool = False) -> list[str]:
    """RDS route config names referenced by HTTP connection managers in listeners."""
    out: set[str] = set()
    for _, value in _any_values(buf, delta):
        lis = listener_pb2.Listener.FromString(value)
        chains = list(lis.filter_chains)
        if lis.HasField("default_filter_chain"):
            chains.append(lis.default_filter_chain)
        for chain in chains:
            for flt in chain.filters:
                if flt.typed_config.type_url != HCM_TYPE:
                    continue
                hcm = hcm_pb2.HttpConnectionManager.FromString(flt.typed_config.value)
                if hcm.HasField("rds") and hcm.rds.route_config_name:
                    out.add(hcm.rds.route_config_name)
    return sorted(out)


def resource_names(buf: bytes, type_url: str, delta: bool = False) -> list[str]:
    """Resource names of a response (delta: from the Resource wrapper, no decoding)."""
    if delta:
        return ["".join(strings(buf[a:b], 3)) for a, b in spans(buf, 2)]
    names = []
    for _, value in _any_values(buf, delta):
        if type_url == CLUSTER:
            names.append(cluster_pb2.Cluster.FromString(value).name)
        elif type_url == ENDPOINT:
            names.append(endpoint_pb2.ClusterLoadAssignment.FromString(value).cluster_name)
        elif type_url == LISTENER:
            names.append(listener_pb2.Listener.FromString(value).name)
        elif type_url == ROUTE:
            names.append(route_pb2.RouteConfiguration.FromString(value).name)
    return names


def resource_sizes(buf: bytes, delta: bool = False) -> list[int]:
    """Serialized size of each resource message (the Any's value)."""
    return [len(value) for _, value in _any_values(buf, delta)]


def cla_addresses(value: bytes) -> list[str]:
    cla = endpoint_pb2.ClusterLoadAssignment.FromString(value)
    return [
        lb.endpoint.address.socket_address.address
        for group in cla.endpoints
        for lb in group.lb_endpoints
    ]


# --- capture files: 4-byte big-endian length, then the message, repeated ---------------


def write_script(path: str, messages: Iterable[bytes]) -> None:
    with open(path, "wb") as f:
        for m in messages:
            f.write(struct.pack(">I", len(m)))
            f.write(m)


def read_script(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    out = []
    pos = 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out
