"""TLS for the secure port (15012): optional, verified client certificates.

Why not grpc's own TLS: grpcio's Python API has one switch for client certificates.
`require_client_auth=False` makes the server *not request* a certificate at all
(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE, checked: no peer certificate ever
reaches the auth context), and True makes one mandatory. The secure port needs
Go's `VerifyClientCertIfGiven`, as istiod has it: agents call CreateCertificate
with a token before they own a certificate, while ADS and renewals present one.

So this module terminates TLS with Python's `ssl` (CERT_OPTIONAL: a presented
certificate is verified against the CA roots, a bad one fails the handshake) and
relays the decrypted HTTP/2 bytes to a plaintext gRPC server on 127.0.0.1. Each
relay connection has its own local port; `PeerTable` (tlspeers.py) maps that port
(what gRPC reports as `context.peer()`) to the verified client certificate and the
real remote address. A direct connection to the internal port maps to nothing, and
the secure port refuses its calls. With `request_limits` the relay also reads the
client's HTTP/2 to refuse oversized requests of chosen methods (h2guard.py).

Connections before their handshake are what an attacker gets for free, so they are
cheap and bounded. TLS runs on `ssl.SSLObject` over memory BIOs in this module:
asyncio's own TLS transport preallocates a 256 KiB buffer for every connection
(4,000 idle sockets cost 1.2 GiB; here 22 MiB). The SSLObject is only created at
the first byte; at most `FrontLimits.handshakes_per_ip` / `handshakes_total`
connections may be in their handshake at once (excess ones are reset at once,
counted in `meshpilot_secure_port_refused_connections` and logged at most every
LOG_EVERY seconds); a handshake must finish within `handshake_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from cryptography import x509
from prometheus_client import Counter

from meshpilot.ca.h2guard import H2ProtocolError, RequestGuard, ResponseFilter
from meshpilot.ca.tlspeers import (
    PeerTable,
    TlsPeer,
    grpc_peer_string,
    normalise_peer,
    server_context,
)
from meshpilot.monitoring.metrics import REGISTRY

__all__ = [
    "FrontLimits",
    "PeerTable",
    "TlsFront",
    "TlsPeer",
    "grpc_peer_string",
    "normalise_peer",
    "server_context",
]

log = structlog.get_logger(__name__)

HANDSHAKE_TIMEOUT = 10.0
# Connections in their TLS handshake at once, from one source address and in all.
# A fleet of agents reconnecting after a restart is spread over many addresses; one
# address with more than this many unfinished handshakes is a misbehaving client.
MAX_HANDSHAKES_PER_IP = 64
MAX_HANDSHAKES = 1024
# At most one log line per this many seconds about refused connections.
LOG_EVERY = 10.0
# Bytes buffered from one side while the other is not ready; then reading pauses.
_HIGH_WATER = 256 * 1024
# Plaintext read from the TLS layer per call: one TLS record at most.
_READ_CHUNK = 16 * 1024
# After a refused message the connection has lost HTTP/2 flow-control credit (the
# dropped bytes are never acknowledged upstream): closed once the refusal is out.
REFUSED_MESSAGE_GRACE = 2.0

REFUSED_CONNECTIONS = Counter(
    "meshpilot_secure_port_refused_connections",
    "Connections to the secure port closed before their TLS handshake, by reason "
    "(per_ip_limit, total_limit, handshake_timeout).",
    ["reason"],
    registry=REGISTRY,
)


@dataclass(frozen=True, slots=True)
class FrontLimits:
    """Bounds on connections that have not finished their TLS handshake."""

    handshakes_per_ip: int = MAX_HANDSHAKES_PER_IP
    handshakes_total: int = MAX_HANDSHAKES
    handshake_timeout: float = HANDSHAKE_TIMEOUT


class TlsFront:
    """Terminates TLS on the public address and relays to the internal gRPC server."""

    def __init__(
        self,
        peers: PeerTable,
        upstream: tuple[str, int],
        context: ssl.SSLContext,
        limits: FrontLimits | None = None,
        *,
        request_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.peers = peers
        self.upstream = upstream
        self._context = context
        self.limits = limits or FrontLimits()
        # gRPC method path -> largest request message relayed (see h2guard).
        self.request_limits = dict(request_limits or {})
        self._server: asyncio.Server | None = None
        self._relays: set[_Relay] = set()
        self.handshake_failures = 0
        # Connections admitted but not yet through their handshake, by source address.
        self._handshaking: dict[str, int] = {}
        self.handshaking = 0
        self.refused = 0
        # Plaintext bytes relayed to the internal server, all connections.
        self.relayed_bytes = 0
        self._refused_unlogged = 0
        self._refusal_logged_at = float("-inf")

    def admit(self, ip: str) -> bool:
        """Take a handshake slot for a new connection from `ip`, or count a refusal."""
        reason = ""
        if self.handshaking >= self.limits.handshakes_total:
            reason = "total_limit"
        elif self._handshaking.get(ip, 0) >= self.limits.handshakes_per_ip:
            reason = "per_ip_limit"
        if not reason:
            self._handshaking[ip] = self._handshaking.get(ip, 0) + 1
            self.handshaking += 1
            return True
        self.refuse(ip, reason)
        return False

    def release(self, ip: str) -> None:
        """Give back the handshake slot of a connection from `ip`."""
        left = self._handshaking.get(ip, 0) - 1
        if left > 0:
            self._handshaking[ip] = left
        else:
            self._handshaking.pop(ip, None)
        self.handshaking -= 1

    def refuse(self, ip: str, reason: str) -> None:
        """Count a connection closed before its handshake; log now and then."""
        self.refused += 1
        REFUSED_CONNECTIONS.labels(reason).inc()
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= LOG_EVERY:
            log.warning(
                "secure port connections refused before the TLS handshake",
                count=self._refused_unlogged,
                last_source=ip,
                reason=reason,
                handshaking=self.handshaking,
                limits=f"{self.limits.handshakes_per_ip} per address, "
                f"{self.limits.handshakes_total} in all, "
                f"{self.limits.handshake_timeout:g}s",
            )
            self._refusal_logged_at = now
            self._refused_unlogged = 0

    @property
    def context(self) -> ssl.SSLContext:
        return self._context

    def set_context(self, context: ssl.SSLContext) -> None:
        """Serve new connections with `context` (a renewed server certificate); open
        connections keep theirs."""
        self._context = context

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        # Plain TCP: TLS is done by each _Relay (see the module docstring).
        self._server = await loop.create_server(
            lambda: _Relay(self), host or None, port, reuse_port=False, backlog=1024
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for relay in list(self._relays):
            relay.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None


class _Upstream(asyncio.Protocol):
    def __init__(self, relay: _Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.relay.to_client(data)

    def eof_received(self) -> bool:
        self.relay.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.upstream_lost()

    def pause_writing(self) -> None:
        self.relay.pause_client_reading()

    def resume_writing(self) -> None:
        self.relay.resume_client_reading()


class _Relay(asyncio.Protocol):
    """One TLS client connection and its plaintext twin to the gRPC server."""

    def __init__(self, front: TlsFront) -> None:
        self.front = front
        self.client: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
        self.key = ""
        self.ip = ""
        self.remote = "unknown"
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.sslobj: ssl.SSLObject | None = None
        self._incoming: ssl.MemoryBIO | None = None
        self._outgoing: ssl.MemoryBIO | None = None
        self.handshaking = False  # holds one of the front's handshake slots
        self.handshake_done = False
        self._timer: asyncio.TimerHandle | None = None
        self.guard: RequestGuard | None = None
        self.response_filter: ResponseFilter | None = None

    # Client side: TCP, then TLS over memory BIOs.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.ip = str(peer[0])
            self.remote = grpc_peer_string(peer)
        if not self.front.admit(self.ip):
            # A reset frees the socket at once, with no TIME_WAIT or lingering close.
            self.closed = True
            transport.abort()
            return
        self.handshaking = True
        self.front._relays.add(self)
        self._timer = asyncio.get_running_loop().call_later(
            self.front.limits.handshake_timeout, self._handshake_timed_out
        )

    def _handshake_timed_out(self) -> None:
        self._timer = None
        if not self.closed and not self.handshake_done:
            self.front.refuse(self.ip, "handshake_timeout")
            self.close()

    def _end_handshake(self) -> None:
        if self.handshaking:
            self.handshaking = False
            self.front.release(self.ip)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.sslobj is None:
            # Created at the first byte: a bare TCP connection costs only its socket.
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.sslobj = self.front.context.wrap_bio(
                self._incoming, self._outgoing, server_side=True
            )
        assert self._incoming is not None
        self._incoming.write(data)
        if not self.handshake_done and not self._handshake():
            return
        self._read_plaintext()

    def _handshake(self) -> bool:
        assert self.sslobj is not None
        try:
            self.sslobj.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, OSError) as e:
            self.front.handshake_failures += 1
            log.debug("secure port handshake failed", peer=self.remote, error=str(e))
            self._flush()  # the alert tells the client why
            self.close()
            return False
        self._flush()
        self.handshake_done = True
        self._end_handshake()
        self._handshake_complete()
        return not self.closed

    def _handshake_complete(self) -> None:
        assert self.sslobj is not None
        cert: x509.Certificate | None = None
        der = self.sslobj.getpeercert(binary_form=True)
        if der:
            # Verified against the roots during the handshake (CERT_OPTIONAL).
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError as e:
                # OpenSSL accepted what cryptography cannot read: refuse rather than
                # silently treat the client as one without a certificate.
                log.warning(
                    "secure port client certificate unreadable", peer=self.remote, error=str(e)
                )
                self.close()
                return
        if self.front.request_limits:
            self.guard = RequestGuard(self.front.request_limits)
            self.response_filter = ResponseFilter()
        self.task = asyncio.get_running_loop().create_task(
            self._connect(TlsPeer(self.remote, cert))
        )

    def _read_plaintext(self) -> None:
        assert self.sslobj is not None
        while not self.closed:
            try:
                chunk = self.sslobj.read(_READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLError, OSError):
                # close_notify, or a broken record: either way the connection is over.
                self._flush()
                self.close()
                return
            if not chunk:
                self.close()
                return
            self._from_client(chunk)
        # Reads can produce TLS output too (TLS 1.3 tickets, key updates).
        self._flush()

    def _flush(self) -> None:
        if self._outgoing is None or self.client is None or self.client.is_closing():
            return
        data = self._outgoing.read()
        if data:
            self.client.write(data)

    async def _connect(self, peer: TlsPeer) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, upstream = await loop.create_connection(
                lambda: _Upstream(self), *self.front.upstream
            )
        except OSError as e:
            log.warning("secure port relay cannot reach the gRPC server", error=str(e))
            self.close()
            return
        if self.closed:
            transport.close()
            return
        self.upstream = upstream
        # Registered before the first byte reaches gRPC, so no call can miss it.
        self.key = grpc_peer_string(transport.get_extra_info("sockname"))
        self.front.peers.add(self.key, peer)
        if self.pending:
            transport.write(b"".join(self.pending))
            self.pending.clear()
            self.pending_bytes = 0
            assert self.client is not None
            self.client.resume_reading()

    def _from_client(self, data: bytes) -> None:
        if self.guard is not None:
            refused = self.guard.refused
            try:
                data = self.guard.feed(data)
            except H2ProtocolError as e:
                log.warning("secure port client closed", peer=self.remote, error=str(e))
                self.close()
                return
            if self.guard.refused != refused:
                log.warning("secure port request above its limit refused", peer=self.remote)
                asyncio.get_running_loop().call_later(REFUSED_MESSAGE_GRACE, self.close)
            if not data:
                return
        self.front.relayed_bytes += len(data)
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.write(data)
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > _HIGH_WATER and self.client is not None:
            self.client.pause_reading()

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.resume_reading()

    # Called by the upstream side.

    def to_client(self, data: bytes) -> None:
        if self.closed or self.sslobj is None:
            return
        if self.response_filter is not None:
            data = self.response_filter.feed(data)
        view = memoryview(data)
        try:
            while view:
                view = view[self.sslobj.write(view) :]
        except (ssl.SSLError, OSError) as e:
            log.debug("secure port write failed", peer=self.remote, error=str(e))
            self.close()
            return
        self._flush()

    def pause_client_reading(self) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.pause_reading()

    def resume_client_reading(self) -> None:
        if self.client is not None and not self.client.is_closing():
            self.client.resume_reading()

    def upstream_lost(self) -> None:
        if self.key:
            self.front.peers.remove(self.key)
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._end_handshake()
        self.front._relays.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.sslobj is not None and self.handshake_done:
            # close_notify; unwrap() then waits for the peer's, which is not needed.
            with contextlib.suppress(ssl.SSLError, OSError, ValueError):
                self.sslobj.unwrap()
            self._flush()
        # close() flushes what is buffered, so the last response still gets out.
        if self.client is not None:
            self.client.close()
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.close()
