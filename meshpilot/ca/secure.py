"""The secure port (Istio's 15012): the CA service and ADS over TLS on one address.

    client --TLS--> TlsFront (public address) --h2c--> grpc.aio server (127.0.0.1:random)
                                                        CertificateService + ADS

The TLS server certificate is issued by the CA (DNS SANs as istiod's) and renewed
at half its lifetime. ADS streams here need a valid workload client certificate
whose namespace is the proxy's own (as istiod checks); CreateCertificate accepts a
bearer token or such a certificate.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, cast

import grpc
import structlog
from cryptography import x509

from meshpilot.api.mesh import MeshConfig
from meshpilot.ca.auth import (
    AuthenticationError,
    Authenticator,
    CallCredentials,
    ClientCertAuthenticator,
    TokenAuthenticator,
    workload_identity,
)
from meshpilot.ca.authority import CertificateAuthority
from meshpilot.ca.identity import SpiffeId
from meshpilot.ca.server import CertificateService
from meshpilot.ca.tlsfront import PeerTable, TlsFront, server_context
from meshpilot.ca.tokens import TokenSigner
from meshpilot.model.proxy import Proxy, ProxyIdError
from meshpilot.monitoring import metrics
from meshpilot.settings import Settings, split_address
from meshpilot.xds import server as xds_server

log = structlog.get_logger(__name__)

# istiod's serving names; agents connect with ssl_target_name_override set to the first.
SERVER_DNS_NAMES = (
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
    "istiod",
    "localhost",
)


def server_names(bind_host: str) -> tuple[list[str], list[str]]:
    """DNS and IP SANs for the serving certificate on `bind_host`."""
    dns = list(SERVER_DNS_NAMES)
    ips = ["127.0.0.1"]
    try:
        ip = ipaddress.ip_address(bind_host)
    except ValueError:
        if bind_host and bind_host not in dns:
            dns.append(bind_host)
    else:
        if not ip.is_unspecified:
            ips.append(str(ip))
    return dns, list(dict.fromkeys(ips))


class SecureADS(xds_server.AggregatedDiscoveryService):
    """ADS for the secure port: the peer must present a workload certificate."""

    def __init__(
        self, discovery: xds_server.DiscoveryServer, peers: PeerTable, trust_domain: str
    ) -> None:
        super().__init__(discovery)
        self._ds = discovery
        self._peers = peers
        self._trust_domain = trust_domain

    async def StreamAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(request_iterator, context, delta=False)

    async def DeltaAggregatedResources(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> None:
        await self._serve(request_iterator, context, delta=True)

    async def _serve(
        self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, *, delta: bool
    ) -> None:
        ident, remote = await self._authenticate(context)
        # The stream's peer is the TLS client, not the relay's loopback socket: that is
        # what /debug/syncz and the connection logs should show.
        ctx = cast(grpc.aio.ServicerContext, _RemotePeer(context, remote))
        await self._ds.serve_stream(_same_namespace(requests, ident, context), ctx, delta=delta)

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[SpiffeId, str]:
        peer = self._peers.for_context(context)
        if peer is None or peer.cert is None:
            metrics.XDS_SECURE_REFUSED.labels("no_client_cert").inc()
            log.warning(
                "xds refused on secure port",
                peer=peer.remote if peer else context.peer(),
                reason="no client certificate",
            )
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "ADS on the secure port needs a workload client certificate issued by this CA",
            )
        assert peer is not None and peer.cert is not None
        try:
            return workload_identity(peer.cert, self._trust_domain), peer.remote
        except AuthenticationError as e:
            metrics.XDS_SECURE_REFUSED.labels("bad_client_cert").inc()
            log.warning("xds refused on secure port", peer=peer.remote, reason=str(e))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"client certificate: {e}")
            raise AssertionError("unreachable") from None


class _RemotePeer:
    """A servicer context whose peer() is the TLS client's address."""

    __slots__ = ("_context", "_remote")

    def __init__(self, context: grpc.aio.ServicerContext, remote: str) -> None:
        self._context = context
        self._remote = remote

    def peer(self) -> str:
        return self._remote

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _same_namespace(
    requests: AsyncIterator[Any], ident: SpiffeId, context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    """Pass the stream through once its first request's node is in `ident`'s namespace.

    A certificate for namespace A must not fetch namespace B's configuration (Istio's
    checkConnectionIdentity). A malformed node is left to the ADS server to refuse.
    """
    it = aiter(requests)
    try:
        first = await anext(it)
    except StopAsyncIteration:
        return
    if first.HasField("node") and first.node.id:
        try:
            namespace = Proxy.from_node(first.node).namespace
        except ProxyIdError:
            namespace = None
        if namespace is not None and namespace != ident.namespace:
            metrics.XDS_SECURE_REFUSED.labels("namespace_mismatch").inc()
            log.warning("xds refused on secure port", identity=str(ident), node_namespace=namespace)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity {ident} may not fetch configuration for namespace {namespace!r}",
            )
    yield first
    async for req in it:
        yield req


class SecurePort:
    """Owns the TLS front, the internal gRPC server and the serving certificate."""

    def __init__(
        self,
        ca: CertificateAuthority,
        discovery: xds_server.DiscoveryServer,
        address: str,
        *,
        authenticators: Sequence[Authenticator] | None = None,
        server_cert_ttl: float | None = None,
    ) -> None:
        self.ca = ca
        self.discovery = discovery
        self.address = address
        self.peers = PeerTable()
        if authenticators is None:
            authenticators = default_authenticators(ca)
        self.authenticators = tuple(authenticators)
        self.service = CertificateService(ca, self.authenticators, self.credentials)
        self.server_cert_ttl = server_cert_ttl or ca.max_ttl
        self.port = 0
        self.internal_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._front: TlsFront | None = None
        self._renew: asyncio.Task[None] | None = None
        self.server_cert: x509.Certificate | None = None

    def credentials(self, context: grpc.aio.ServicerContext) -> CallCredentials:
        """Metadata plus the TLS peer's verified certificate for one call."""
        peer = self.peers.for_context(context)
        return CallCredentials(
            CallCredentials.metadata_from(context.invocation_metadata() or ()),
            peer.cert if peer else None,
            peer.remote if peer else (context.peer() or ""),
        )

    async def start(self) -> int:
        host, port = split_address(self.address)
        self._grpc = grpc.aio.server(options=xds_server.SERVER_OPTIONS)
        self.service.register(self._grpc)
        self.discovery.register(
            self._grpc, SecureADS(self.discovery, self.peers, self.ca.trust_domain)
        )
        self.internal_port = xds_server.bind(self._grpc, "127.0.0.1:0")
        await self._grpc.start()
        self._front = TlsFront(
            self.peers, ("127.0.0.1", self.internal_port), self._new_context(host)
        )
        try:
            self.port = await self._front.start(host, port)
        except OSError as e:
            await self._grpc.stop(0)
            raise OSError(
                f"secure xDS/CA port cannot listen on {self.address}: {e.strerror or e}"
            ) from e
        self._renew = asyncio.create_task(self._renew_loop(host), name="secure-port-cert-renewal")
        log.info("secure port listening", address=f"{host}:{self.port}", ca_mode=self.ca.mode)
        return self.port

    def _new_context(self, host: str) -> ssl.SSLContext:
        dns, ips = server_names(host)
        chain, key = self.ca.issue_server_cert(dns, ips, self.server_cert_ttl)
        self.server_cert = x509.load_pem_x509_certificate(chain[0].encode())
        return server_context("".join(chain), key, self.ca.root_cert_pem)

    async def _renew_loop(self, host: str) -> None:
        while True:
            assert self.server_cert is not None
            start = self.server_cert.not_valid_before_utc.timestamp()
            end = self.server_cert.not_valid_after_utc.timestamp()
            # Half-life, as workload certificates; at least a second between attempts.
            await asyncio.sleep(max(1.0, start + (end - start) / 2 - time.time()))
            try:
                ctx = self._new_context(host)
            except Exception:
                log.exception("secure port certificate renewal failed; retrying in 60s")
                await asyncio.sleep(60)
                continue
            assert self._front is not None
            self._front.set_context(ctx)
            log.info(
                "secure port certificate renewed",
                not_after=self.server_cert.not_valid_after_utc.isoformat(),
            )

    async def stop(self) -> None:
        if self._renew is not None:
            self._renew.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renew
        if self._front is not None:
            await self._front.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)


def default_authenticators(ca: CertificateAuthority) -> list[Authenticator]:
    """Tokens of the CA directory, then client certificates (renewal)."""
    auths: list[Authenticator] = []
    if ca.ca_dir is not None:
        try:
            signer = TokenSigner.from_ca_dir(Path(ca.ca_dir))
        except (OSError, ValueError) as e:
            # A read-only plug-in directory (a mounted secret): certificates still work.
            log.warning("token authentication disabled", dir=str(ca.ca_dir), error=str(e))
        else:
            auths.append(TokenAuthenticator(signer, ca.trust_domain))
    auths.append(ClientCertAuthenticator(ca.trust_domain))
    return auths


async def start_secure_port(
    settings: Settings, mesh: MeshConfig, discovery: xds_server.DiscoveryServer
) -> SecurePort:
    """Load or create the CA of `--ca-dir` and start the secure port (serve.py's hook)."""
    assert settings.ca_dir is not None
    ca = await asyncio.to_thread(
        CertificateAuthority.load_or_create,
        settings.ca_dir,
        settings.trust_domain or mesh.trust_domain,
        default_ttl=settings.workload_cert_ttl,
        max_ttl=settings.max_workload_cert_ttl,
    )
    port = SecurePort(ca, discovery, settings.secure_xds_address)
    await port.start()
    return port
