"""Protobuf wire format for xDS responses, built from pre-serialized resources.

DiscoveryResponse and DeltaDiscoveryResponse are assembled by hand around a shared
block of encoded resources, without re-encoding anything. Fields are written in
field-number order and empty strings are left out, as protobuf's own serializer does,
so the bytes are exactly those of SerializeToString() on the equivalent message.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from meshpilot.xds.resources import Joined, Resource


def varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(number: int, data: bytes) -> bytes:
    """A length-delimited field."""
    return varint((number << 3) | 2) + varint(len(data)) + data


def string_field(number: int, value: str) -> bytes:
    """A proto3 string field: absent when empty."""
    return field(number, value.encode()) if value else b""


def sotw_entry(r: Resource) -> bytes:
    return field(2, r.body.SerializeToString())


def delta_entry(r: Resource) -> bytes:
    # envoy.service.discovery.v3.Resource: version=1, resource=2, name=3.
    inner = (
        string_field(1, r.version) + field(2, r.body.SerializeToString()) + string_field(3, r.name)
    )
    return field(2, inner)


def sotw_response(
    version: str, type_url: str, nonce: str, control_plane: bytes, block: bytes
) -> bytes:
    """A DiscoveryResponse: version_info=1, resources=2 (`block`, from sotw_entry),
    type_url=4, nonce=5, control_plane=6 (the serialized ControlPlane message)."""
    return (
        string_field(1, version)
        + block
        + string_field(4, type_url)
        + string_field(5, nonce)
        + field(6, control_plane)
    )


def delta_response(
    version: str,
    type_url: str,
    nonce: str,
    removed: Sequence[str],
    control_plane: bytes,
    block: bytes,
) -> bytes:
    """A DeltaDiscoveryResponse: system_version_info=1, resources=2 (`block`, from
    delta_entry), type_url=4, nonce=5, removed_resources=6, control_plane=7."""
    return b"".join(
        (
            string_field(1, version),
            block,
            string_field(4, type_url),
            string_field(5, nonce),
            *[field(6, n.encode()) for n in removed],
            field(7, control_plane),
        )
    )


class Encoder:
    """Encoded resources, keyed by the identity of immutable shared objects.

    Two levels: whole resource lists (the generator shares one Generated among proxies
    of the same scope, so a CDS push frames its clusters once, not once per proxy), and
    single resources (per-proxy lists such as EDS for a proxy's own cluster names still
    share their ClusterLoadAssignments). Holding the object keeps its id from being
    reused while cached.
    """

    def __init__(
        self,
        max_block_bytes: int = 64 * 1024 * 1024,
        max_blocks: int = 512,
        max_entries: int = 200_000,
    ) -> None:
        self._blocks: dict[tuple[int, bool], tuple[Sequence[Resource], bytes]] = {}
        self._block_bytes = 0
        self._max_block_bytes = max_block_bytes
        self._max_blocks = max_blocks
        # id(resource) -> (resource, encoded entry); one map per wire format.
        self._entries: tuple[dict[int, tuple[Resource, bytes]], ...] = ({}, {})
        self._max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def entry(self, r: Resource, delta: bool, keep: bool = True) -> bytes:
        """`r` framed as one entry; kept for reuse only if `keep` (see Generated.shared)."""
        cached = self._entries[delta].get(id(r))
        if cached is not None and cached[0] is r:
            return cached[1]
        if not keep:
            return delta_entry(r) if delta else sotw_entry(r)
        return self._add_entry(r, delta)

    def __len__(self) -> int:
        """Entries and blocks held."""
        return len(self._entries[0]) + len(self._entries[1]) + len(self._blocks)

    def _add_entry(self, r: Resource, delta: bool) -> bytes:
        data = delta_entry(r) if delta else sotw_entry(r)
        entries = self._entries[delta]
        if len(entries) >= self._max_entries:
            # Drop the older half at once: amortized O(1), unlike popping one at a time.
            kept = dict(itertools.islice(entries.items(), self._max_entries // 2, None))
            entries.clear()
            entries.update(kept)
        entries[id(r)] = (r, data)
        return data

    def block(self, resources: Sequence[Resource], delta: bool, keep: bool = True) -> bytes:
        """The entries of `resources`, framed; kept for reuse only if `keep`."""
        if isinstance(resources, Joined):
            # Each shared part is framed once and kept, whatever the whole is; the
            # proxy's own part is not.
            return b"".join(
                [
                    self.block(part, delta, shared)
                    for part, shared in zip(resources.parts, resources.shared_parts, strict=True)
                ]
            )
        if not keep:
            return b"".join([self.entry(r, delta, keep=False) for r in resources])
        key = (id(resources), delta)
        cached = self._blocks.pop(key, None)
        if cached is not None and cached[0] is resources:
            self.hits += 1
            self._blocks[key] = cached  # most recently used goes last
            return cached[1]
        if cached is not None:
            self._block_bytes -= len(cached[1])
        self.misses += 1
        get = self._entries[delta].get
        parts = []
        for r in resources:
            hit = get(id(r))
            parts.append(hit[1] if hit is not None and hit[0] is r else self._add_entry(r, delta))
        data = b"".join(parts)
        if len(data) <= self._max_block_bytes // 4:
            self._blocks[key] = (resources, data)
            self._block_bytes += len(data)
            while self._block_bytes > self._max_block_bytes or len(self._blocks) > self._max_blocks:
                oldest = next(iter(self._blocks))
                self._block_bytes -= len(self._blocks.pop(oldest)[1])
        return data


class SotwRequest:
    """A DiscoveryRequest with the bytes it was parsed from.

    Envoy repeats every subscribed name in each EDS/RDS ACK; comparing the raw names
    section with the previous request's is far cheaper than turning thousands of
    names into Python strings (see Connection.on_sotw_request). Attribute access is
    delegated to the message, so code reading requests does not change.
    """

    __slots__ = ("msg", "raw")

    def __init__(self, msg: discovery_pb2.DiscoveryRequest, raw: bytes) -> None:
        self.msg = msg
        self.raw = raw

    @classmethod
    def parse(cls, raw: bytes) -> SotwRequest:
        return cls(discovery_pb2.DiscoveryRequest.FromString(raw), raw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.msg, name)


class Undecodable:
    """A request whose bytes do not parse: what the deserializer returns instead of
    raising, so the stream handler can answer INVALID_ARGUMENT with one log line (an
    exception in a deserializer ends the stream as UNKNOWN, with a traceback in the log)."""

    __slots__ = ("error", "message", "size")

    def __init__(self, message: str, size: int, error: str) -> None:
        self.message = message
        self.size = size
        self.error = error

    @staticmethod
    def HasField(name: str) -> bool:
        # Code that peeks at a stream's first request before the server (the secure
        # port's namespace check) sees a request without a node and passes it on.
        return False

    def __str__(self) -> str:
        return f"{self.message}: {self.size} bytes that do not decode ({self.error})"


def parse_sotw(raw: bytes) -> SotwRequest | Undecodable:
    try:
        return SotwRequest.parse(raw)
    except DecodeError as e:
        return Undecodable("DiscoveryRequest", len(raw), str(e))


def parse_delta(raw: bytes) -> discovery_pb2.DeltaDiscoveryRequest | Undecodable:
    try:
        return discovery_pb2.DeltaDiscoveryRequest.FromString(raw)
    except DecodeError as e:
        return Undecodable("DeltaDiscoveryRequest", len(raw), str(e))
