"""ADS on gRPC: server options, method registration, writing to a stream.

Handlers are registered generically with our own (de)serializers: requests that do not
decode become wire.Undecodable instead of an exception inside gRPC (which would end the
stream as UNKNOWN and log a traceback), and responses go out as the bytes sotw.py and
delta.py assembled.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc

from meshpilot.xds import wire

if TYPE_CHECKING:
    from meshpilot.xds.connection import Connection

SERVICE_NAME = "envoy.service.discovery.v3.AggregatedDiscoveryService"
# Envoy's own default is unlimited; a big mesh's CDS easily passes gRPC's 4 MiB.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Requests are small: the largest is an EDS/RDS subscription repeating every name
# (MAX_NAMES_PER_TYPE names of Envoy's ~60-character cluster names is well under 1
# MiB). gRPC refuses a bigger message (RESOURCE_EXHAUSTED) before buffering it, so an
# unauthenticated client cannot make the server hold hundreds of MB per request.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    # A second server on a busy port must fail, not share it silently.
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    # Istio's keepalive: find dead proxies within a minute, tolerate idle clients that ping.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 15_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_concurrent_streams", 100_000),
)


def _serialize(message: Any) -> bytes:
    # Responses are pre-encoded bytes; messages are accepted too for simplicity elsewhere.
    return message if isinstance(message, bytes) else message.SerializeToString()


def register_ads(server: grpc.aio.Server, servicer: Any) -> None:
    """Register `servicer`'s two ADS methods on `server` with the raw (de)serializers."""
    handlers = {
        "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.StreamAggregatedResources,
            request_deserializer=wire.parse_sotw,
            response_serializer=_serialize,
        ),
        "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
            servicer.DeltaAggregatedResources,
            request_deserializer=wire.parse_delta,
            response_serializer=_serialize,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def bind(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Add a listening port; returns the bound port and raises OSError if it is taken."""
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        raise OSError(f"xDS server cannot listen on {address}: {e}") from e
    if port == 0:
        raise OSError(f"xDS server cannot listen on {address}")
    return int(port)


class ClientGone(Exception):
    """A write failed because the client went away (reset, killed, network gone)."""


class Writer:
    """The write side of one stream, with the connection it belongs to."""

    __slots__ = ("_write", "conn")

    def __init__(self, conn: Connection, context: grpc.aio.ServicerContext) -> None:
        self.conn = conn
        self._write = context.write

    async def write(self, data: bytes) -> None:
        try:
            await self._write(data)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # Responses are bytes already (nothing left to serialize), so a failed
            # write is the transport: the peer is gone. That is an ordinary end of a
            # stream, not a server error.
            raise ClientGone(type(e).__name__) from e
