"""The ADS server: SotW and Delta streams, requests and pushes to connections.

One asyncio task per stream owns its Connection: it handles client requests and
pushes in order, so per-stream state needs no locks. The protocol state is changed
only by WatchedResource (watched.py); responses are built by sotw.py and delta.py and
written as pre-encoded bytes: resource bodies are already serialized Anys, and a
resource list shared by many proxies (same scope) is framed once and reused.

Unlike Istio, every client-supplied size is bounded here: request bytes (gRPC),
names per type, node id length, and the text of client strings in logs and statuses.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import structlog
from envoy.service.discovery.v3 import ads_pb2_grpc

from meshpilot.model.proxy import Proxy, ProxyIdError
from meshpilot.model.push_request import PushRequest
from meshpilot.monitoring import metrics
from meshpilot.untrusted import truncate_untrusted
from meshpilot.xds import transport, typeurls, wire
from meshpilot.xds.connection import (
    Connection,
    Interner,
    Kind,
    PendingPush,
    Reply,
    TooManyNames,
    WatchedResource,
)
from meshpilot.xds.delta import DeltaResponses
from meshpilot.xds.resources import Generated, Generator, PushContextLike
from meshpilot.xds.sotw import SotwResponses
from meshpilot.xds.transport import (
    MAX_REQUEST_BYTES,
    SERVER_OPTIONS,
    SERVICE_NAME,
    ClientGone,
    Writer,
    bind,
)

__all__ = [
    "MAX_REQUEST_BYTES",
    "SERVER_OPTIONS",
    "SERVICE_NAME",
    "AggregatedDiscoveryService",
    "ClientGone",
    "DiscoveryServer",
    "bind",
    "create_server",
    "start",
]

log = structlog.get_logger(__name__)

KNOWN_TYPES = frozenset(typeurls.PUSH_ORDER)
# Envoy's node ids are a few dozen characters; Istio's longest are far below this.
MAX_NODE_ID_CHARS = 1024
# Client text quoted in a status message (the status travels back to that client only,
# but also into our log).
MAX_ERROR_CHARS = 512


def _per_type(metric: Any) -> dict[str, Any]:
    # labels() takes a lock and a dict lookup per call; resolve the children once.
    return {t: metric.labels(typeurls.short(t)) for t in typeurls.PUSH_ORDER}


_PUSHES = _per_type(metrics.XDS_PUSHES)
_PUSH_TIME = _per_type(metrics.XDS_PUSH_TIME)


# --- Server ------------------------------------------------------------------------


class DiscoveryServer:
    """Holds the ADS connections, answers their requests and pushes config to them.

    All methods must be called from the event loop thread that runs the gRPC server.
    Requests that arrive before the first push context is known wait for it: answering
    a reconnecting Envoy with an empty config would wipe its listeners and clusters.
    """

    def __init__(
        self,
        generator: Generator[Any],
        context: PushContextLike | None = None,
        *,
        instance_id: str | None = None,
        max_queued_requests: int = 64,
    ) -> None:
        self.generator = generator
        # Distinct across restarts and replicas, so nonces never collide with a
        # previous server's nonce that a reconnecting Envoy still carries.
        self.instance_id = instance_id or f"{socket.gethostname()}-{secrets.token_hex(3)}"
        self._nonce_prefix = f"{secrets.token_hex(4)}-"
        self._nonces = itertools.count(1)
        self._conn_ids = itertools.count(1)
        self._connections: dict[str, Connection] = {}
        # Subscriptions shared by identity across this server's streams (bounded, and
        # emptied as streams end).
        self._interner = Interner()
        self._max_queued_requests = max_queued_requests
        self._current: PushContextLike | None = None
        self._ready = asyncio.Event()
        self._encoder = wire.Encoder()
        self._sotw = SotwResponses(self._encoder, self._next_nonce, self.instance_id)
        self._delta = DeltaResponses(self._encoder, self._next_nonce, self.instance_id)
        self.servicer = AggregatedDiscoveryService(self)
        stats = getattr(generator, "resource_cache_stats", None)
        if callable(stats):
            # The process's /metrics shows the cache of the server that serves it.
            metrics.XDS_CACHE.set_source(stats)
        if context is not None:
            self._set_current(context)

    # Public API.

    @property
    def current(self) -> PushContextLike | None:
        """The push context that requests are answered from."""
        return self._current

    @property
    def connections(self) -> tuple[Connection, ...]:
        """A snapshot of the live connections."""
        return tuple(self._connections.values())

    def connections_for(self, proxy_id: str) -> list[Connection]:
        """Live connections of one proxy (several are allowed, as in Istio)."""
        return [c for c in self._connections.values() if c.proxy.id == proxy_id]

    def push(self, request: PushRequest, context: PushContextLike) -> int:
        """Make `context` current and queue the push on every connection.

        Returns the number of connections queued. Cheap: the work happens in each
        connection's task, which merges pushes it has not started yet.
        """
        self._set_current(context)
        for conn in self._connections.values():
            conn.enqueue_push(request, context)
        return len(self._connections)

    def table_sizes(self) -> dict[str, int]:
        """Entries in the server's shared tables, for tests and debugging: none of them
        may keep growing with what clients send once those clients are gone."""
        return {
            "connections": len(self._connections),
            "interned_subscriptions": len(self._interner),
            "encoded": len(self._encoder),
            "shared_messages": len(self._sotw),
        }

    def sync_status(self) -> list[dict[str, Any]]:
        """Per-connection sync state with Istio's /debug/syncz keys."""
        out = []
        for conn in self._connections.values():
            p = conn.proxy
            entry: dict[str, Any] = {
                "proxy": p.id,
                "conn_id": conn.conn_id,
                "proxy_type": p.type,
                "cluster_id": p.cluster_id,
                "istio_version": truncate_untrusted(p.istio_version, 64),
                "delta": conn.delta,
                "address": conn.peer,
                "connected_at": conn.connected_at,
            }
            for type_url, label in _SYNCZ_LABELS.items():
                w = conn.watched.get(type_url)
                entry[f"{label}_sent"] = w.nonce_sent if w else ""
                entry[f"{label}_acked"] = w.nonce_acked if w else ""
                entry[f"{label}_nack"] = w.nack if w else ""
            out.append(entry)
        return out

    def register(
        self, server: grpc.aio.Server, servicer: AggregatedDiscoveryService | None = None
    ) -> None:
        """Add the ADS service to a gRPC server.

        `servicer` replaces the default one on this server only: the secure port
        (meshpilot/secure_port.py) passes one that authenticates the peer first.
        """
        transport.register_ads(server, servicer or self.servicer)

    # Stream handling.

    def _set_current(self, context: PushContextLike) -> None:
        self._current = context
        self._ready.set()

    async def serve_stream(
        self,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        *,
        delta: bool,
    ) -> None:
        """Run one ADS stream until the client goes away."""
        it = aiter(requests)
        try:
            first = await anext(it)
        except StopAsyncIteration:
            return
        peer = truncate_untrusted(context.peer() or "")
        if isinstance(first, wire.Undecodable):
            await self._refuse_undecodable(context, first, peer=peer)
            return
        try:
            if not first.HasField("node") or not first.node.id:
                raise ProxyIdError("the first request on an ADS stream must carry node.id")
            if len(first.node.id) > MAX_NODE_ID_CHARS:
                raise ProxyIdError(
                    f"node.id: {len(first.node.id)} characters, expected at most "
                    f"{MAX_NODE_ID_CHARS} (TYPE~IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN)"
                )
            proxy = Proxy.from_node(first.node)
        except ProxyIdError as e:
            error = truncate_untrusted(e, MAX_ERROR_CHARS)
            log.warning("xds rejected stream", peer=peer, error=error)
            # abort() raises: the stream ends with this status, the server goes on.
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
            return

        conn = Connection(
            f"{truncate_untrusted(proxy.id)}-{next(self._conn_ids)}",
            proxy,
            delta=delta,
            peer=peer,
            max_queued_requests=self._max_queued_requests,
            interner=self._interner,
        )
        self._connections[conn.conn_id] = conn
        version_label = metrics.XDS_CLIENT_VERSIONS.connected(proxy.istio_version)
        log.info("xds connected", conn=conn.conn_id, delta=delta, peer=conn.peer)
        await conn.put_request(first)
        reader = asyncio.create_task(self._read(it, conn), name=f"xds-read-{conn.conn_id}")
        refused = ""
        try:
            await self._ready.wait()
            writer = Writer(conn, context)
            while (event := await conn.next_event()) is not None:
                if isinstance(event, PendingPush):
                    await self._push_connection(writer, event.request, event.context)
                else:
                    await self._handle_request(writer, event)
                # Generation is synchronous (up to ~0.1 s for a maximal subscription of
                # names that do not exist): let every other stream have its turn before
                # this one does more, so one busy or hostile client cannot starve them.
                await asyncio.sleep(0)
        except ClientGone as e:
            log.info("xds client gone during a write", conn=conn.conn_id, error=str(e))
            # There is no one to send a status to, and gRPC cannot finish the call
            # normally after a failed write (it would log its own error): end it the
            # way it ends a call the client cancelled.
            raise asyncio.CancelledError from None
        except TooManyNames as e:
            log.warning("xds request refused", conn=conn.conn_id, error=str(e))
            refused = str(e)
        finally:
            reader.cancel()
            conn.release()
            del self._connections[conn.conn_id]
            metrics.XDS_CLIENT_VERSIONS.disconnected(version_label)
            log.info("xds disconnected", conn=conn.conn_id)
        if refused:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused)
        if conn.undecodable is not None:
            await self._refuse_undecodable(context, conn.undecodable, conn=conn.conn_id)

    @staticmethod
    async def _refuse_undecodable(
        context: grpc.aio.ServicerContext, bad: wire.Undecodable, **where: str
    ) -> None:
        log.warning(
            "xds request undecodable",
            **where,
            message=bad.message,
            size=bad.size,
            error=truncate_untrusted(bad.error),
        )
        # abort() raises: the stream ends with this status, the server goes on.
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(bad))

    async def _read(self, it: AsyncIterator[Any], conn: Connection) -> None:
        try:
            async for req in it:
                if isinstance(req, wire.Undecodable):
                    # Requests before it are handled; the connection task then ends
                    # the stream with INVALID_ARGUMENT.
                    conn.undecodable = req
                    break
                # Most requests are plain ACKs (every push gets one per stream). While
                # the connection task is idle, handling one here is exactly what that
                # task would do next, with no write: skip its wakeup.
                if (
                    conn.idle
                    and req.type_url in KNOWN_TYPES
                    and self._current is not None
                    and conn.is_plain_ack(req)
                ):
                    self._handle_plain_ack(conn, req)
                    continue
                await conn.put_request(req)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            # The RPC failed or was cancelled by the client; the main task ends too.
            log.debug("xds stream read ended", conn=conn.conn_id, error=truncate_untrusted(repr(e)))
        finally:
            conn.close_input()

    def _handle_plain_ack(self, conn: Connection, req: Any) -> None:
        outcome = conn.on_delta_request(req) if conn.delta else conn.on_sotw_request(req)
        # is_plain_ack() promised this; anything else would need the connection task.
        assert outcome.kind is Kind.ACK and outcome.reply is None and outcome.dirty is None
        self._observe_convergence(conn)

    async def _handle_request(self, writer: Writer, req: Any) -> None:
        conn = writer.conn
        type_url = req.type_url
        if type_url not in KNOWN_TYPES:
            if conn.warn_unknown_type(type_url):
                log.warning(
                    "xds unknown type ignored",
                    conn=conn.conn_id,
                    type_url=truncate_untrusted(type_url),
                )
            return
        outcome = conn.on_delta_request(req) if conn.delta else conn.on_sotw_request(req)
        w = conn.watched[type_url]
        short = typeurls.short(type_url)
        if outcome.kind is Kind.STALE:
            metrics.XDS_EXPIRED_NONCE.labels(short).inc()
            log.debug(
                "xds stale nonce",
                conn=conn.conn_id,
                type=short,
                nonce=truncate_untrusted(req.response_nonce),
            )
        elif outcome.kind is Kind.NACK:
            metrics.TOTAL_XDS_REJECTS.labels(short).inc()
            log.warning(
                "xds nack",
                conn=conn.conn_id,
                type=short,
                nonce=w.nonce_sent,
                error=truncate_untrusted(w.nack, MAX_ERROR_CHARS),
            )
        elif outcome.kind is Kind.INIT:
            log.debug("xds subscribe", conn=conn.conn_id, type=short, names=len(w.names))
        if outcome.reply is not None:
            await self._reply(writer, w, outcome.reply)
        elif outcome.dirty is not None:
            ctx = self._current
            assert ctx is not None
            await self._push_type(writer, w, outcome.dirty, ctx)
        self._observe_convergence(conn)

    async def _reply(self, writer: Writer, w: WatchedResource, reply: Reply) -> None:
        ctx = self._current
        assert ctx is not None
        names = reply.scope if reply.scope is not None else w.subscription
        gen = self._generate(writer.conn, w.type_url, ctx, names, None)
        if gen is None:
            if not writer.conn.delta and w.type_url in typeurls.WILDCARD_TYPES:
                # An empty SotW CDS/LDS response would delete everything the proxy has.
                return
            gen = Generated((), complete=False)
        await self._send(writer, w, gen, ctx, reply.scope, forced=True)

    async def _push_connection(
        self, writer: Writer, request: PushRequest, ctx: PushContextLike
    ) -> None:
        conn = writer.conn
        for type_url in typeurls.PUSH_ORDER:
            w = conn.watched.get(type_url)
            if w is None or (not request.full and type_url != typeurls.ENDPOINT):
                continue
            if w.awaiting_ack:
                w.defer(request)
                conn.note_push_started(request.start)
                continue
            await self._push_type(writer, w, request, ctx)
        self._observe_convergence(conn)

    async def _push_type(
        self, writer: Writer, w: WatchedResource, request: PushRequest, ctx: PushContextLike
    ) -> None:
        if w.idle:
            return
        t0 = time.perf_counter()
        gen = self._generate(writer.conn, w.type_url, ctx, w.subscription, request)
        if gen is None:
            return
        if not writer.conn.delta and not gen.complete and w.type_url in typeurls.WILDCARD_TYPES:
            # SotW CDS/LDS must be complete; ask again for the full set.
            gen = self._generate(writer.conn, w.type_url, ctx, w.subscription, None)
            if gen is None or not gen.complete:
                return
        if await self._send(writer, w, gen, ctx, None, forced=False):
            writer.conn.note_push_started(request.start)
            _PUSH_TIME[w.type_url].observe(time.perf_counter() - t0)

    def _generate(
        self,
        conn: Connection,
        type_url: str,
        ctx: PushContextLike,
        names: frozenset[str] | None,
        request: PushRequest | None,
    ) -> Generated | None:
        try:
            return self.generator.generate(type_url, conn.proxy, ctx, names, request)
        except Exception:
            # A generator bug for one proxy must not end its stream: it keeps the
            # last config it has, and the error is in the log with the proxy name.
            log.exception(
                "xds generate failed",
                conn=conn.conn_id,
                type=typeurls.short(type_url),
                version=ctx.version,
            )
            return None

    async def _send(
        self,
        writer: Writer,
        w: WatchedResource,
        gen: Generated,
        ctx: PushContextLike,
        scope: frozenset[str] | None,
        *,
        forced: bool,
    ) -> bool:
        """Send `gen` for `w` if there is something new (or `forced`). True if sent."""
        conn = writer.conn
        if conn.delta:
            data = self._delta.build(conn.watched, w, gen, ctx.version, scope, forced)
        else:
            data = self._sotw.build(w, gen, ctx.version, scope, forced)
        if data is None:
            return False
        if w.type_url == typeurls.CLUSTER and not conn.delta:
            eds = conn.watched.get(typeurls.ENDPOINT)
            if eds is not None:
                eds.set_always_respond(True)
        elif w.type_url == typeurls.ENDPOINT and gen.complete and scope is None:
            w.set_always_respond(False)
        await writer.write(data)
        _PUSHES[w.type_url].inc()
        return True

    def _next_nonce(self) -> str:
        return f"{self._nonce_prefix}{next(self._nonces)}"

    @staticmethod
    def _observe_convergence(conn: Connection) -> None:
        start = conn.take_converged()
        if start is not None:
            metrics.PROXY_CONVERGENCE_TIME.observe(time.monotonic() - start)


_SYNCZ_LABELS = {
    typeurls.CLUSTER: "cluster",
    typeurls.LISTENER: "listener",
    typeurls.ROUTE: "route",
    typeurls.ENDPOINT: "endpoint",
    typeurls.SECRET: "secret",
}


# The generated servicer base is untyped (xds-protos ships no stubs).
class AggregatedDiscoveryService(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """The gRPC servicer; all logic is in DiscoveryServer."""

    def __init__(self, discovery: DiscoveryServer) -> None:
        self._discovery = discovery

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await self._discovery.serve_stream(request_iterator, context, delta=False)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await self._discovery.serve_stream(request_iterator, context, delta=True)


def create_server(
    discovery: DiscoveryServer, *, options: Sequence[tuple[str, Any]] = ()
) -> grpc.aio.Server:
    """An unstarted grpc.aio server with ADS registered; add ports, then start it."""
    server = grpc.aio.server(options=(*SERVER_OPTIONS, *options))
    discovery.register(server)
    return server


async def start(
    address: str,
    discovery: DiscoveryServer,
    *,
    credentials: grpc.ServerCredentials | None = None,
) -> grpc.aio.Server:
    """Create, bind and start the ADS server (e.g. on 127.0.0.1:15010)."""
    server = create_server(discovery)
    port = bind(server, address, credentials)
    await server.start()
    log.info("xds server listening", address=address, port=port, pid=os.getpid())
    return server
