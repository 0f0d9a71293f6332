"""Wiring of the secure port (Istio's 15012): the CA service and ADS over TLS.

istiod serves CreateCertificate and ADS on one TLS port. meshpilot's CA package
(meshpilot/ca/) owns the TLS front, the serving certificate and the CA service and
knows nothing of xDS; this module, on the floor of serve.py, registers ADS on the
secure port's internal server. ADS streams here need a valid workload client
certificate whose namespace is the proxy's own (as istiod checks).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc
import structlog

from meshpilot.api.mesh import MeshConfig
from meshpilot.ca.auth import AnyAuthenticator, AuthenticationError, workload_identity
from meshpilot.ca.authority import CertificateAuthority
from meshpilot.ca.identity import SpiffeId
from meshpilot.ca.secure import Registrar, SecurePort, default_authenticators
from meshpilot.ca.tlsfront import PeerTable
from meshpilot.model.proxy import Proxy, ProxyIdError
from meshpilot.monitoring import metrics
from meshpilot.settings import Settings
from meshpilot.untrusted import truncate_untrusted
from meshpilot.xds import server as xds_server

log = structlog.get_logger(__name__)

# Istio's receive limit for xDS requests (ISTIO_GPRC_MAXRECVMSGSIZE, 4 MiB) rather than
# the plaintext port's: this port faces the network. CSRs have their own 64 KiB limit,
# applied by the TLS front.
SECURE_MAX_RECEIVE_BYTES = 4 * 1024 * 1024
SECURE_SERVER_OPTIONS = (
    *(o for o in xds_server.SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length"),
    ("grpc.max_receive_message_length", SECURE_MAX_RECEIVE_BYTES),
)


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
            log.warning(
                "xds refused on secure port",
                identity=str(ident),
                node_namespace=truncate_untrusted(namespace),
            )
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"identity {ident} may not fetch configuration for namespace "
                f"{truncate_untrusted(namespace)!r}",
            )
    yield first
    async for req in it:
        yield req


def register_ads(discovery: xds_server.DiscoveryServer, trust_domain: str) -> Registrar:
    """The SecurePort hook that serves ADS, authenticated by client certificate."""

    def register(server: grpc.aio.Server, peers: PeerTable) -> None:
        discovery.register(server, SecureADS(discovery, peers, trust_domain))

    return register


async def start_secure_port(
    settings: Settings,
    mesh: MeshConfig,
    discovery: xds_server.DiscoveryServer,
    *,
    ca: CertificateAuthority | None = None,
    extra_authenticators: Sequence[AnyAuthenticator] = (),
) -> SecurePort:
    """Start the secure port with `ca`, else the CA of `--ca-dir` (loaded or created).

    `extra_authenticators` come after the CA's own (its directory's tokens, client
    certificates): in Kubernetes mode, ServiceAccount tokens checked by TokenReview.
    """
    if ca is None:
        assert settings.ca_dir is not None
        ca = await asyncio.to_thread(
            CertificateAuthority.load_or_create,
            settings.ca_dir,
            settings.trust_domain or mesh.trust_domain,
            default_ttl=settings.workload_cert_ttl,
            max_ttl=settings.max_workload_cert_ttl,
        )
    port = SecurePort(
        ca,
        settings.secure_xds_address,
        register=register_ads(discovery, ca.trust_domain),
        server_options=SECURE_SERVER_OPTIONS,
        authenticators=[*default_authenticators(ca), *extra_authenticators],
    )
    await port.start()
    return port
