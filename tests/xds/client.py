"""A minimal in-process ADS client (SotW and Delta) for protocol tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from tests.xds.fake_generator import decode

NODE_ID = "sidecar~10.1.0.7~reviews-v1-abc.default~default.svc.cluster.local"
TIMEOUT = 2.0
QUIET = 0.25


def node(
    node_id: str = NODE_ID,
    istio_version: str = "1.24.0",
    metadata: Mapping[str, Any] | None = None,
) -> base_pb2.Node:
    meta = struct_pb2.Struct()
    meta.update({"ISTIO_VERSION": istio_version, "NAMESPACE": "default", **(metadata or {})})
    return base_pb2.Node(id=node_id, metadata=meta)


class _Stream:
    """Queue-fed request stream plus a background reader, so reads can time out."""

    def __init__(self) -> None:
        self._out: asyncio.Queue[Any] = asyncio.Queue()
        self._in: asyncio.Queue[Any] = asyncio.Queue()
        self.call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self.sent_node = False
        # ISTIO_VERSION in the node metadata of the first request.
        self.istio_version = "1.24.0"

    async def _requests(self) -> AsyncIterator[Any]:
        while (req := await self._out.get()) is not None:
            yield req

    def _start(self, call: Any) -> None:
        self.call = call
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for resp in self.call:
                await self._in.put(resp)
        except grpc.aio.AioRpcError as e:
            await self._in.put(e)
        await self._in.put(None)

    def _put(self, req: Any) -> None:
        self._out.put_nowait(req)

    async def recv(self, within: float = TIMEOUT) -> Any:
        item = await asyncio.wait_for(self._in.get(), within)
        if isinstance(item, BaseException):
            raise item
        if item is None:
            raise EOFError("stream ended")
        return item

    async def recv_many(self, n: int, within: float = TIMEOUT) -> list[Any]:
        return [await self.recv(within) for _ in range(n)]

    async def expect_nothing(self, quiet: float = QUIET) -> None:
        try:
            item = await asyncio.wait_for(self._in.get(), quiet)
        except TimeoutError:
            return
        raise AssertionError(f"expected no response, got {item!r}")

    async def error(self, within: float = TIMEOUT) -> grpc.aio.AioRpcError:
        item = await asyncio.wait_for(self._in.get(), within)
        assert isinstance(item, grpc.aio.AioRpcError), f"expected an RPC error, got {item!r}"
        return item

    async def close(self) -> None:
        self._out.put_nowait(None)
        if self.call is not None:
            self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass


class SotwClient(_Stream):
    def __init__(
        self,
        channel: grpc.aio.Channel,
        node_id: str = NODE_ID,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.node_id = node_id
        # Node metadata besides the defaults (NAMESPACE, LABELS, ...).
        self.metadata = metadata
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self._start(stub.StreamAggregatedResources(self._requests()))

    def request(
        self,
        type_url: str,
        names: Iterable[str] = (),
        *,
        nonce: str = "",
        version: str = "",
        error: str | None = None,
        with_node: bool | None = None,
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=list(names),
            response_nonce=nonce,
            version_info=version,
        )
        if with_node or (with_node is None and not self.sent_node):
            req.node.CopyFrom(node(self.node_id, self.istio_version, self.metadata))
            self.sent_node = True
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._put(req)

    def ack(self, resp: discovery_pb2.DiscoveryResponse, names: Iterable[str] = ()) -> None:
        self.request(resp.type_url, names, nonce=resp.nonce, version=resp.version_info)

    def nack(
        self,
        resp: discovery_pb2.DiscoveryResponse,
        error: str,
        names: Iterable[str] = (),
        version: str = "",
    ) -> None:
        self.request(resp.type_url, names, nonce=resp.nonce, version=version, error=error)


class DeltaClient(_Stream):
    def __init__(self, channel: grpc.aio.Channel, node_id: str = NODE_ID) -> None:
        super().__init__()
        self.node_id = node_id
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self._start(stub.DeltaAggregatedResources(self._requests()))

    def request(
        self,
        type_url: str,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        *,
        nonce: str = "",
        initial: Mapping[str, str] | None = None,
        error: str | None = None,
    ) -> None:
        req = discovery_pb2.DeltaDiscoveryRequest(
            type_url=type_url,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            response_nonce=nonce,
            initial_resource_versions=dict(initial or {}),
        )
        if not self.sent_node:
            req.node.CopyFrom(node(self.node_id, self.istio_version))
            self.sent_node = True
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._put(req)

    def ack(self, resp: discovery_pb2.DeltaDiscoveryResponse) -> None:
        self.request(resp.type_url, nonce=resp.nonce)

    def nack(self, resp: discovery_pb2.DeltaDiscoveryResponse, error: str) -> None:
        self.request(resp.type_url, nonce=resp.nonce, error=error)


def names_of(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    """Resource names in a SotW response, decoded from the Any payloads."""
    return [decode(a)[0] for a in resp.resources]


def tags_of(resp: discovery_pb2.DiscoveryResponse) -> dict[str, str]:
    """name -> content tag of each resource in a SotW response."""
    return dict(decode(a) for a in resp.resources)


def delta_names(resp: discovery_pb2.DeltaDiscoveryResponse) -> list[str]:
    return [r.name for r in resp.resources]
