"""Inbound peer authentication: which filter chains a workload port gets.

Istio's filter chain match options (listener_inbound.go, filterchain_options.go), for
the mode PeerAuthentication gives the port (model/security.py):

* STRICT: one chain, transport `tls`, terminating mesh mTLS. Plaintext finds no chain
  on that port and the connection is closed.
* PERMISSIVE: mTLS when the TLS inspector sees a client offering Istio's ALPN
  (`istio`, `istio-peer-exchange`, ...), else plaintext (`raw_buffer`). TCP ports also
  pass other TLS (an application's own) through untouched.
* DISABLE: plaintext only. The chain matches any transport, so the TLS inspector is
  not needed there and is turned off for the port (server-first protocols never
  send the bytes it would wait for).

A Sidecar `ingress[].tls` replaces all of this for its port: TLS terminated with the
files it names (SIMPLE, or MUTUAL with client certificates), as in Istio.

A proxy without the agent's SDS (tls.proxy_has_sds) cannot terminate mesh mTLS: its
PERMISSIVE ports are plaintext, and its STRICT ports refuse every connection rather
than fall back to plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass

from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.security import DISABLE, PERMISSIVE, STRICT, PeerAuthnPolicy
from meshpilot.translators.authz import AuthzFilters, build_authz_filters
from meshpilot.translators.plan import InboundPlan
from meshpilot.translators.tls import (
    ALL_ISTIO_MTLS_ALPNS,
    inbound_mtls,
    proxy_has_sds,
    sidecar_ingress_tls,
)

TLS = "tls"
RAW_BUFFER = "raw_buffer"


@dataclass(frozen=True, slots=True)
class ChainVariant:
    """One filter chain of a port: its match, and the TLS it terminates (if any)."""

    transport_protocol: str = ""
    application_protocols: tuple[str, ...] = ()
    tls: tls_pb2.DownstreamTlsContext | None = None
    # The chain verifies a client certificate: the HCM tells the app who called (XFCC).
    peer_certificate: bool = False
    # Close every connection (STRICT without the means to terminate mTLS).
    reject: bool = False

    @property
    def needs_tls_inspector(self) -> bool:
        return self.transport_protocol == TLS


PLAINTEXT = ChainVariant()
REJECT = ChainVariant(reject=True)


@dataclass(frozen=True, slots=True)
class InboundSecurity:
    """What a workload's inbound chains take from PeerAuthentication and
    AuthorizationPolicy; computed once per listener build."""

    peer: PeerAuthnPolicy
    authz: AuthzFilters
    # The proxy has the agent's SDS: it can terminate mesh mTLS.
    sds: bool = True


def inbound_security(push: PushContext, proxy: Proxy) -> InboundSecurity:
    return InboundSecurity(
        push.security.peer_authentication(proxy.namespace, proxy.labels),
        build_authz_filters(push, proxy),
        proxy_has_sds(proxy),
    )


def mtls_variants(mode: str, *, http: bool, sds: bool = True) -> tuple[ChainVariant, ...]:
    """The chains of a port in PeerAuthentication mode `mode`."""
    if mode == DISABLE:
        return (PLAINTEXT,)
    if not sds:
        return (REJECT,) if mode == STRICT else (PLAINTEXT,)
    mtls = ChainVariant(TLS, (), inbound_mtls(http=http), True)
    if mode == STRICT:
        return (mtls,)
    assert mode == PERMISSIVE, mode
    mtls = ChainVariant(TLS, ALL_ISTIO_MTLS_ALPNS, mtls.tls, True)
    plaintext = ChainVariant(RAW_BUFFER)
    if http:
        # Declared HTTP: other TLS would not be HTTP anyway (Istio drops it too).
        return (mtls, plaintext)
    return (mtls, ChainVariant(TLS), plaintext)


def plan_variants(plan: InboundPlan, security: InboundSecurity) -> tuple[ChainVariant, ...]:
    """The chains of one inbound port."""
    http = plan.protocol.is_http
    if plan.tls is not None:
        ctx = sidecar_ingress_tls(plan.tls, http=http)
        if ctx is not None:
            return (ChainVariant(TLS, (), ctx, ctx.HasField("require_client_certificate")),)
    return mtls_variants(security.peer.mode_for(plan.port), http=http, sds=security.sds)


def passthrough_variants(
    security: InboundSecurity, port: int | None = None
) -> tuple[ChainVariant, ...]:
    """Chains for traffic to ports no service declares (the catch-all, or a port only
    `portLevelMtls` names): TCP, in the workload's (or that port's) mode."""
    peer = security.peer
    mode = peer.mode if port is None else peer.mode_for(port)
    return mtls_variants(mode, http=False, sds=security.sds)


def extra_passthrough_ports(peer: PeerAuthnPolicy, plans: list[InboundPlan]) -> list[int]:
    """portLevelMtls ports without an inbound chain of their own whose mode differs from
    the catch-all's: they get passthrough chains of their own (as in Istio)."""
    declared = {p.port for p in plans}
    return sorted(
        port for port, mode in peer.port_modes.items() if port not in declared and mode != peer.mode
    )
