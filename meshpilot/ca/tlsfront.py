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
relay connection has its own local port; `PeerTable` maps that port (what gRPC
reports as `context.peer()`) to the verified client certificate and the real
remote address. A direct connection to the internal port maps to nothing, so it
is treated as a client without a certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from cryptography import x509

log = structlog.get_logger(__name__)

HANDSHAKE_TIMEOUT = 10.0
# Bytes buffered from one side while the other is not ready; then reading pauses.
_HIGH_WATER = 256 * 1024


@dataclass(frozen=True, slots=True)
class TlsPeer:
    """One client of the secure port, as seen by the TLS front."""

    remote: str
    cert: x509.Certificate | None


class PeerTable:
    """Relay connections by the gRPC peer string of their upstream side."""

    def __init__(self) -> None:
        self._peers: dict[str, TlsPeer] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def add(self, grpc_peer: str, peer: TlsPeer) -> None:
        self._peers[grpc_peer] = peer

    def remove(self, grpc_peer: str) -> None:
        self._peers.pop(grpc_peer, None)

    def get(self, grpc_peer: str) -> TlsPeer | None:
        return self._peers.get(grpc_peer)

    def for_context(self, context: grpc.aio.ServicerContext) -> TlsPeer | None:
        return self._peers.get(context.peer() or "")


def grpc_peer_string(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """How grpc's `context.peer()` names the client at this socket address."""
    host, port = sockname[0], sockname[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def server_context(chain_pem: str, key_pem: str, root_pem: str) -> ssl.SSLContext:
    """A TLS server context: our chain, client certificates optional but verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # gRPC clients refuse a server that does not negotiate h2 by ALPN.
    ctx.set_alpn_protocols(["h2"])
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=root_pem)
    with _secret_file(chain_pem + key_pem) as path:
        ctx.load_cert_chain(path)
    return ctx


@contextlib.contextmanager
def _secret_file(text: str) -> Iterator[str]:
    """A path for `load_cert_chain`, which only reads files: an anonymous memory file
    where Linux has one, so the serving key never touches a disk."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("meshpilot-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode())
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="meshpilot-tls-") as d:
        path = Path(d) / "cert.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        yield str(path)


class TlsFront:
    """Terminates TLS on the public address and relays to the internal gRPC server."""

    def __init__(
        self, peers: PeerTable, upstream: tuple[str, int], context: ssl.SSLContext
    ) -> None:
        self.peers = peers
        self.upstream = upstream
        self._context = context
        self._server: asyncio.Server | None = None
        self._relays: set[_Relay] = set()
        self.handshake_failures = 0

    def set_context(self, context: ssl.SSLContext) -> None:
        """Serve new connections with `context` (a renewed server certificate)."""
        self._context = context

    async def start(self, host: str, port: int) -> int:
        listen_ctx = self._make_listen_context()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Relay(self),
            host or None,
            port,
            ssl=listen_ctx,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
            reuse_port=False,
            backlog=1024,
        )
        return int(self._server.sockets[0].getsockname()[1])

    def _make_listen_context(self) -> ssl.SSLContext:
        # The listening context only dispatches: on every ClientHello it switches the
        # connection to the current context, so a renewed certificate applies to new
        # connections without closing the socket.
        base = self._context

        def pick(
            obj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext
        ) -> None:
            if self._context is not base:
                obj.context = self._context

        base.sni_callback = pick
        return base

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
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    # Client (TLS) side.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.client = transport
        self.front._relays.add(self)
        cert: x509.Certificate | None = None
        sslobj = transport.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        peer = transport.get_extra_info("peername")
        remote = grpc_peer_string(peer) if peer else "unknown"
        if der:
            # Verified against the roots during the handshake (CERT_OPTIONAL).
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError as e:
                # OpenSSL accepted what cryptography cannot read: refuse rather than
                # silently treat the client as one without a certificate.
                log.warning("secure port client certificate unreadable", peer=remote, error=str(e))
                self.close()
                return
        self.task = asyncio.get_running_loop().create_task(self._connect(TlsPeer(remote, cert)))

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

    def data_received(self, data: bytes) -> None:
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
        if self.client is not None and not self.client.is_closing():
            self.client.write(data)

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
        self.front._relays.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        # close() flushes what is buffered, so the last response still gets out.
        if self.client is not None:
            self.client.close()
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.close()
