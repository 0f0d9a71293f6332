"""The secure port (Istio's 15012): the CA service, and what else is registered, over TLS.

    client --TLS--> TlsFront (public address) --h2c--> grpc.aio server (127.0.0.1:random)
                                                        CertificateService + registered services

The TLS server certificate is issued by the CA (DNS SANs as istiod's) and renewed
at half its lifetime. CreateCertificate accepts a bearer token or a workload
certificate. istiod also serves ADS on this port; here the CA knows nothing of xDS:
meshpilot/secure_port.py registers ADS through the `register` hook, so that this
package stays below the model and xDS floors.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import structlog
from cryptography import x509

from meshpilot.addresses import split_address
from meshpilot.ca.auth import (
    AnyAuthenticator,
    AuthenticationError,
    Authenticator,
    CallCredentials,
    ClientCertAuthenticator,
    TokenAuthenticator,
)
from meshpilot.ca.authority import CertificateAuthority
from meshpilot.ca.server import MAX_REQUEST_BYTES, METHOD_PATH, CertificateService
from meshpilot.ca.tlsfront import PeerTable, TlsFront, server_context
from meshpilot.ca.tokens import TokenSigner

log = structlog.get_logger(__name__)

# istiod's serving names; agents connect with ssl_target_name_override set to the first.
SERVER_DNS_NAMES = (
    "istiod.istio-system.svc",
    "istiod.istio-system.svc.cluster.local",
    "istiod",
    "localhost",
)

# Options of the internal gRPC server when the caller passes none: the CA alone, so
# gRPC itself refuses a request above the CA's limit from its length prefix.
DEFAULT_SERVER_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
)

# Registers more services on the internal server; gets the table that maps a call
# to its TLS peer, so those services can authenticate it.
Registrar = Callable[[grpc.aio.Server, PeerTable], None]


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


class SecurePort:
    """Owns the TLS front, the internal gRPC server and the serving certificate."""

    def __init__(
        self,
        ca: CertificateAuthority,
        address: str,
        *,
        register: Registrar | None = None,
        server_options: Sequence[tuple[str, Any]] = DEFAULT_SERVER_OPTIONS,
        authenticators: Sequence[AnyAuthenticator] | None = None,
        server_cert_ttl: float | None = None,
    ) -> None:
        self.ca = ca
        self.address = address
        self._register = register
        self._server_options = tuple(server_options)
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
        """Metadata plus the TLS peer's verified certificate for one call.

        The internal server listens on loopback in plaintext for the front's relays
        only: a call that did not come through the front (another local process
        connecting to the internal port directly) is refused, token or not.
        """
        peer = self.peers.for_context(context)
        if peer is None:
            raise AuthenticationError(
                f"call from {context.peer() or 'an unknown peer'} did not come through "
                "the secure port's TLS front"
            )
        return CallCredentials(
            CallCredentials.metadata_from(context.invocation_metadata() or ()),
            peer.cert,
            peer.remote,
        )

    async def start(self) -> int:
        host, port = split_address(self.address)
        self._grpc = grpc.aio.server(options=self._server_options)
        self.service.register(self._grpc)
        if self._register is not None:
            self._register(self._grpc, self.peers)
        self.internal_port = self._grpc.add_insecure_port("127.0.0.1:0")
        if self.internal_port == 0:
            raise OSError("secure port: the internal gRPC server cannot listen on 127.0.0.1")
        await self._grpc.start()
        self._front = TlsFront(
            self.peers,
            ("127.0.0.1", self.internal_port),
            self._new_context(host),
            # The CA's limit, from each message's length prefix, whatever the internal
            # server's own limit (larger when it also serves ADS).
            request_limits={METHOD_PATH: MAX_REQUEST_BYTES},
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
