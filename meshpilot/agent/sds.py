"""The agent's SDS server: Envoy's `SecretDiscoveryService` on a unix socket.

Serves Istio's secret names: `default` (the workload certificate chain and its
private key), `ROOTCA` (the trust bundle), and the file-backed `file-cert:CERT~KEY`
and `file-root:CA` (see filesecrets). Both the SotW (`StreamSecrets`) and the
delta (`DeltaSecrets`) protocols follow the project's xDS rules: per-stream nonces,
stale nonces ignored, a NACK is recorded and logged and the same content is never
resent, at most one un-ACKed response per stream, and an answer is never held back
because some requested name does not exist. The nonce/ACK/NACK bookkeeping is the
control plane's own (meshpilot/xds/protocol.py, which imports nothing of the control
plane but the discovery protos).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import stat
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from meshpilot.agent import logfmt
from meshpilot.agent.filesecrets import FileSecrets
from meshpilot.xds.protocol import Handshake, Kind

log = logfmt.get_logger(__name__)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    # A second agent on the same socket must fail, not share it.
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
)


@dataclass(frozen=True, slots=True)
class SecretEntry:
    """One secret as served: serialized once, shared by every stream."""

    name: str
    version: str
    resource: any_pb2.Any


class SecretCache:
    """The current secrets by name; listeners are told which names changed."""

    def __init__(self, start_id: str | None = None) -> None:
        # Versions differ across agent restarts, so Envoy never mistakes a new secret
        # for one it already has (versions stay distinct across restarts).
        # os.urandom, as secrets.token_hex, without loading secrets' hmac and hashlib.
        self.start_id = start_id or f"{int(time.time()):x}{os.urandom(2).hex()}"
        self._counter = itertools.count(1)
        self._entries: dict[str, SecretEntry] = {}
        self._listeners: list[Callable[[frozenset[str]], None]] = []
        self.version = f"{self.start_id}-0"

    def get(self, name: str) -> SecretEntry | None:
        return self._entries.get(name)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def set_workload(self, chain_pem: bytes, key_pem: bytes) -> SecretEntry:
        """Replace `default`: the chain (leaf first) and its key, inline for Envoy."""
        secret = secret_pb2.Secret(name=WORKLOAD_SECRET)
        secret.tls_certificate.certificate_chain.inline_bytes = chain_pem
        secret.tls_certificate.private_key.inline_bytes = key_pem
        return self._set(secret)

    def set_root(self, root_pem: bytes) -> SecretEntry | None:
        """Replace `ROOTCA`; None (and no push) when the bundle did not change."""
        secret = secret_pb2.Secret(name=ROOT_SECRET)
        secret.validation_context.trusted_ca.inline_bytes = root_pem
        return self.set_if_changed(secret)

    def set_if_changed(self, secret: secret_pb2.Secret) -> SecretEntry | None:
        """Store any secret by its name; None (and no push) when it is unchanged."""
        old = self._entries.get(secret.name)
        if old is not None and old.resource.value == secret.SerializeToString():
            return None
        return self._set(secret)

    def _set(self, secret: secret_pb2.Secret) -> SecretEntry:
        self.version = f"{self.start_id}-{next(self._counter)}"
        packed = any_pb2.Any()
        packed.Pack(secret)
        entry = SecretEntry(secret.name, self.version, packed)
        self._entries[secret.name] = entry
        changed = frozenset({secret.name})
        for listener in list(self._listeners):
            listener(changed)
        return entry

    def subscribe(self, listener: Callable[[frozenset[str]], None]) -> Callable[[], None]:
        """Call `listener(names)` after each change; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)


# --- per-stream protocol state (no I/O, unit-testable) ---------------------------------


@dataclass(slots=True)
class SotwStream:
    """One `StreamSecrets` stream: what Envoy asked for, what it got, what it said.

    Every response carries all of the stream's existing subscribed secrets: with Envoy's
    shared SotW mux, a secret missing from a response would read as removed.
    """

    cache: SecretCache
    stream_id: int = 0
    names: tuple[str, ...] = ()
    # The nonce / ACK / NACK state machine shared with the control plane's ADS.
    handshake: Handshake = field(default_factory=Handshake)
    # (name, version) pairs of the last response; equal content is never resent.
    sent: tuple[tuple[str, str], ...] | None = None
    sent_names: frozenset[str] | None = None
    _nonces: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def nonce(self) -> str:
        return self.handshake.nonce_sent

    @property
    def nack(self) -> str:
        return self.handshake.nack

    @property
    def acked_version(self) -> str:
        return self.handshake.version_acked

    def on_request(
        self, req: discovery_pb2.DiscoveryRequest
    ) -> discovery_pb2.DiscoveryResponse | None:
        """Apply a request; return the response to send, if any."""
        if req.type_url and req.type_url != SECRET_TYPE_URL:
            log.warning(
                "sds request for another type ignored", stream=self.stream_id, type_url=req.type_url
            )
            return None
        kind = self.handshake.on_request(req, req.version_info)
        if kind is Kind.STALE:
            log.debug("sds stale nonce", stream=self.stream_id, nonce=req.response_nonce[:256])
            return None
        if kind is Kind.NACK:
            log.warning(
                "sds nack: Envoy rejected the secrets",
                stream=self.stream_id,
                names=list(req.resource_names),
                version=req.version_info,
                error=self.nack,
            )
        elif kind is Kind.ACK:
            log.debug("sds ack", stream=self.stream_id, version=req.version_info)
        self.names = tuple(dict.fromkeys(req.resource_names))
        return self._maybe_respond()

    def on_change(self, changed: frozenset[str]) -> discovery_pb2.DiscoveryResponse | None:
        """A secret changed in the cache: push it unless a response awaits its ACK."""
        if not changed.intersection(self.names):
            return None
        return self._maybe_respond()

    def _maybe_respond(self) -> discovery_pb2.DiscoveryResponse | None:
        if self.handshake.awaiting_ack:
            return None  # backpressure: re-evaluated when the ACK or NACK arrives
        entries = [e for n in self.names if (e := self.cache.get(n)) is not None]
        content = tuple(sorted((e.name, e.version) for e in entries))
        # A changed subscription is always answered, even when nothing it names exists:
        # Envoy must never wait on us in silence (it NACKs, and the NACK is logged).
        if content == self.sent and frozenset(self.names) == self.sent_names:
            return None
        missing = [n for n in self.names if self.cache.get(n) is None]
        if missing:
            log.warning("sds unknown secret names", stream=self.stream_id, names=missing)
        nonce = f"{self.cache.start_id}-{self.stream_id}-{next(self._nonces)}"
        self.handshake.sent(nonce, self.cache.version)
        self.sent, self.sent_names = content, frozenset(self.names)
        resp = discovery_pb2.DiscoveryResponse(
            version_info=self.cache.version, type_url=SECRET_TYPE_URL, nonce=nonce
        )
        resp.resources.extend(e.resource for e in entries)
        log.debug(
            "sds push",
            stream=self.stream_id,
            names=[e.name for e in entries],
            version=resp.version_info,
        )
        return resp


@dataclass(slots=True)
class DeltaStream:
    """One `DeltaSecrets` stream: subscribed names and the version Envoy has of each."""

    cache: SecretCache
    stream_id: int = 0
    subscribed: set[str] = field(default_factory=set)
    wildcard: bool = False
    # Versions Envoy holds (or last rejected): never resent. "" marks "told it is absent".
    sent: dict[str, str] = field(default_factory=dict)
    # The nonce / ACK / NACK state machine shared with the control plane's ADS.
    handshake: Handshake = field(default_factory=Handshake)
    started: bool = False
    _nonces: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def nonce(self) -> str:
        return self.handshake.nonce_sent

    @property
    def nack(self) -> str:
        return self.handshake.nack

    def on_request(
        self, req: discovery_pb2.DeltaDiscoveryRequest
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        """Apply a request; return the response to send, if any."""
        if req.type_url and req.type_url != SECRET_TYPE_URL:
            log.warning(
                "sds request for another type ignored", stream=self.stream_id, type_url=req.type_url
            )
            return None
        if not self.started:
            self.started = True
            # After a reconnect Envoy says what it has; identical versions are not resent.
            self.sent.update(req.initial_resource_versions)
            if not req.resource_names_subscribe:
                self.wildcard = True
        kind = self.handshake.on_request(req, self.handshake.version_sent)
        if kind is Kind.NACK:
            log.warning(
                "sds nack: Envoy rejected the secrets", stream=self.stream_id, error=self.nack
            )
        elif kind is Kind.ACK:
            log.debug("sds ack", stream=self.stream_id, nonce=req.response_nonce)
        elif kind is Kind.STALE:
            # Stale ACK/NACK; the subscription changes it carries still apply below,
            # since delta requests are changes and dropping one would lose it.
            log.debug("sds stale nonce", stream=self.stream_id, nonce=req.response_nonce[:256])
        for name in req.resource_names_subscribe:
            if name == "*":
                self.wildcard = True
            else:
                self.subscribed.add(name)
        for name in req.resource_names_unsubscribe:
            if name == "*":
                self.wildcard = False
            self.subscribed.discard(name)
            self.sent.pop(name, None)
        return self._maybe_respond()

    def on_change(self, changed: frozenset[str]) -> discovery_pb2.DeltaDiscoveryResponse | None:
        """A secret changed in the cache: push it unless a response awaits its ACK."""
        if not self.wildcard and not changed.intersection(self.subscribed):
            return None
        return self._maybe_respond()

    def _wanted(self) -> list[str]:
        if self.wildcard:
            return sorted(set(self.cache.names()) | self.subscribed)
        return sorted(self.subscribed)

    def _maybe_respond(self) -> discovery_pb2.DeltaDiscoveryResponse | None:
        if self.handshake.awaiting_ack or not self.started:
            return None
        resources = []
        removed = []
        for name in self._wanted():
            entry = self.cache.get(name)
            if entry is None:
                # Delta's way to say "does not exist": a removal, once, for a name Envoy
                # subscribed to (never for names it did not ask about).
                if self.sent.get(name) != "" and name in self.subscribed:
                    removed.append(name)
                    self.sent[name] = ""
                continue
            if self.sent.get(name) != entry.version:
                resources.append(entry)
                self.sent[name] = entry.version
        if not resources and not removed:
            return None
        if removed:
            log.warning("sds unknown secret names", stream=self.stream_id, names=removed)
        nonce = f"{self.cache.start_id}-d{self.stream_id}-{next(self._nonces)}"
        self.handshake.sent(nonce, self.cache.version)
        resp = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=self.cache.version,
            type_url=SECRET_TYPE_URL,
            nonce=nonce,
            removed_resources=removed,
        )
        for entry in resources:
            resp.resources.add(name=entry.name, version=entry.version, resource=entry.resource)
        log.debug(
            "sds push",
            stream=self.stream_id,
            names=[e.name for e in resources],
            removed=removed,
        )
        return resp


# --- gRPC service ----------------------------------------------------------------------

_CLOSED = object()


# The generated servicer base is untyped (xds-protos ships no stubs).
class SecretDiscoveryService(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """grpc.aio servicer for SotW and delta SDS, backed by a SecretCache."""

    def __init__(self, cache: SecretCache, files: FileSecrets | None = None) -> None:
        self.cache = cache
        self.files = files or FileSecrets(cache)
        self._ids = itertools.count(1)
        self.streams: dict[int, SotwStream | DeltaStream] = {}

    async def StreamSecrets(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = SotwStream(self.cache, next(self._ids))
        async for resp in self._serve(stream, request_iterator):
            yield resp

    async def DeltaSecrets(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        stream = DeltaStream(self.cache, next(self._ids))
        async for resp in self._serve(stream, request_iterator):
            yield resp

    async def FetchSecrets(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """REST-style fetch: the requested secrets that exist, now."""
        resp = discovery_pb2.DiscoveryResponse(
            version_info=self.cache.version, type_url=SECRET_TYPE_URL
        )
        for name in request.resource_names:
            if (entry := self.cache.get(name)) is not None:
                resp.resources.append(entry.resource)
        return resp

    async def _serve(
        self, stream: SotwStream | DeltaStream, request_iterator: AsyncIterator[Any]
    ) -> AsyncIterator[Any]:
        # One queue carries both requests and change notices, so one task decides
        # everything for the stream in order and no push races an ACK.
        events: asyncio.Queue[Any] = asyncio.Queue()
        pending: set[str] = set()

        def changed(names: frozenset[str]) -> None:
            if not pending:
                events.put_nowait(pending)
            pending.update(names)

        async def read() -> None:
            try:
                async for req in request_iterator:
                    events.put_nowait(req)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.debug("sds stream read ended", stream=stream.stream_id, error=repr(e))
            finally:
                events.put_nowait(_CLOSED)

        unsubscribe = self.cache.subscribe(changed)
        reader = asyncio.create_task(read(), name=f"sds-read-{stream.stream_id}")
        self.streams[stream.stream_id] = stream
        log.debug(
            "sds stream opened", stream=stream.stream_id, delta=isinstance(stream, DeltaStream)
        )
        try:
            while (event := await events.get()) is not _CLOSED:
                if event is pending:
                    names = frozenset(pending)
                    pending.clear()
                    resp = stream.on_change(names)
                else:
                    # Istio's file-backed names are read before the answer, so the
                    # first response already carries them.
                    if isinstance(event, discovery_pb2.DeltaDiscoveryRequest):
                        await self.files.ensure(event.resource_names_subscribe)
                    else:
                        await self.files.ensure(event.resource_names)
                    resp = stream.on_request(event)
                if resp is not None:
                    yield resp
        finally:
            unsubscribe()
            reader.cancel()
            del self.streams[stream.stream_id]
            log.debug("sds stream closed", stream=stream.stream_id)


# The service of each running server, for stop_server: kept beside grpc's server object
# rather than written onto it (it declares no such attribute).
_SERVICES: weakref.WeakKeyDictionary[grpc.aio.Server, SecretDiscoveryService] = (
    weakref.WeakKeyDictionary()
)


def service_of(server: grpc.aio.Server) -> SecretDiscoveryService | None:
    """The SDS service a running server (from start_server) serves, for debugging."""
    return _SERVICES.get(server)


def _clear_stale_socket(path: Path) -> None:
    # A socket file left by a dead agent is replaced; a live one belongs to another
    # agent using this workdir, which is refused.
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            path.unlink(missing_ok=True)
            return
    raise OSError(f"{path}: another agent is serving SDS there")


async def start_server(
    socket_path: Path, cache: SecretCache, *, files: FileSecrets | None = None
) -> grpc.aio.Server:
    """Serve SDS on `unix:socket_path` (mode 0600) and return the started server."""
    await asyncio.to_thread(_clear_stale_socket, socket_path)
    server = grpc.aio.server(options=SERVER_OPTIONS)
    service = SecretDiscoveryService(cache, files)
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(service, server)
    try:
        port = server.add_insecure_port(f"unix:{socket_path}")
    except RuntimeError as e:
        raise OSError(f"SDS server cannot listen on {socket_path}: {e}") from e
    if port == 0:
        raise OSError(f"SDS server cannot listen on {socket_path}")
    # The directory is 0700 already; the mode is a second lock on the same door.
    os.chmod(socket_path, 0o600)
    await server.start()
    _SERVICES[server] = service
    return server


async def stop_server(server: grpc.aio.Server, socket_path: Path, grace: float = 0.5) -> None:
    """Stop serving and remove the socket file."""
    await server.stop(grace)
    service = _SERVICES.pop(server, None)
    if service is not None:
        await service.files.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)
