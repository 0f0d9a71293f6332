"""TLS origination for outbound clusters: a DestinationRule's `tls` block, and Istio's
auto mTLS.

Istio's buildAutoMtlsSettings (cluster_tls.go), in order:

* DISABLE: plaintext. SIMPLE and MUTUAL: an UpstreamTlsContext whose CA, client
  certificate and key are files Envoy reads itself (Istio serves them over SDS).
* ISTIO_MUTUAL: mesh mTLS with the workload certificate from the agent (SDS `default`
  and `ROOTCA`), SNI `outbound_.PORT_.SUBSET_.FQDN` unless the rule names one, the
  destination's SPIFFE identities unless it lists subjectAltNames, ALPN
  `istio-peer-exchange`, `istio`. Set as the cluster's transport socket: every
  endpoint gets mTLS, sidecar or not (the user asked for it).
* No `tls` at all: auto mTLS (mesh `enableAutoMtls`, on by default) originates the
  same ISTIO_MUTUAL context, but through `transport_socket_matches`: endpoints whose
  EDS metadata says `tlsMode: istio` (they run a sidecar) get mTLS, the others
  plaintext. Not for mesh-external services, nor when the destination namespace's
  PeerAuthentication (namespace or mesh level) is DISABLE. Passthrough (ORIGINAL_DST)
  clusters carry no endpoint metadata: mTLS there only when every endpoint has a
  sidecar, as a plain transport socket.

Unlike Istio, auto mTLS needs at least one endpoint of the port with a sidecar (so a
mesh of plaintext workloads never depends on SDS), and none of this reaches a proxy
without the agent's SDS (tls.proxy_has_sds), which could not load the certificates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2

from meshpilot.api.networking import ClientTLSSettings
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.security import DISABLE
from meshpilot.model.service import Resolution, Service
from meshpilot.translators import naming
from meshpilot.translators.common import pack
from meshpilot.translators.tls import (
    RAW_BUFFER_TRANSPORT_SOCKET,
    TLS_TRANSPORT_SOCKET,
    istio_mutual_upstream,
    proxy_has_sds,
    san_matchers,
)
from meshpilot.translators.traffic_policy import EffectivePolicy

Cluster: TypeAlias = cluster_pb2.Cluster
TransportSocketMatch: TypeAlias = cluster_pb2.Cluster.TransportSocketMatch
HttpProtocolOptions: TypeAlias = http_protocol_options_pb2.HttpProtocolOptions

ALPN_H2 = ("h2",)
TLS_MODE_ISTIO = "istio"
# Names and match of Istio's auto-mTLS transport socket matches.
TLS_MODE_MATCH_KEY = "tlsMode"
ISTIO_MATCH_NAME = "tlsMode-istio"
DISABLED_MATCH_NAME = "tlsMode-disabled"


@dataclass(frozen=True, slots=True)
class MeshMtls:
    """What ISTIO_MUTUAL needs for one cluster, explicit or automatic."""

    sni: str
    identities: tuple[str, ...]
    # Auto mTLS applies when the DestinationRule sets no `tls`.
    auto: bool


NO_MESH_MTLS = MeshMtls("", (), False)


def mesh_mtls(
    push: PushContext,
    proxy: Proxy,
    svc: Service,
    port: int,
    subset: str,
    policy: EffectivePolicy,
) -> MeshMtls | None:
    """SNI, identities and the auto-mTLS decision for `outbound|port|subset|svc`; None
    when `proxy` cannot do mesh mTLS at all."""
    if not proxy_has_sds(proxy):
        return None
    return MeshMtls(
        naming.outbound_sni(port, subset, svc.hostname),
        push.service_identities(svc),
        _auto_mtls(push, svc, port, policy),
    )


def _auto_mtls(push: PushContext, svc: Service, port: int, policy: EffectivePolicy) -> bool:
    """Istio's BestEffortInferServiceMTLSMode, as far as auto mTLS looks at it."""
    if not push.mesh.enable_auto_mtls or svc.mesh_external:
        return False
    endpoints = push.service_endpoints(svc.hostname, port)
    lb = policy.load_balancer
    if svc.resolution is Resolution.PASSTHROUGH or (lb is not None and lb.simple == "PASSTHROUGH"):
        if not endpoints or any(ep.tls_mode != TLS_MODE_ISTIO for ep in endpoints):
            return False
    elif not any(ep.tls_mode == TLS_MODE_ISTIO for ep in endpoints):
        return False
    return push.security.namespace_mtls_mode(svc.namespace) != DISABLE


def apply_tls(
    c: Cluster,
    opts: HttpProtocolOptions,
    tls: ClientTLSSettings | None,
    *,
    h2: bool,
    mesh: MeshMtls | None = NO_MESH_MTLS,
) -> None:
    """Set the cluster's transport socket (or auto-mTLS socket matches). `mesh` None:
    the proxy has no SDS, so no ISTIO_MUTUAL, explicit or automatic."""
    if tls is None:
        if mesh is not None and mesh.auto:
            _auto(c, istio_mutual_upstream(mesh.sni, san_matchers(mesh.identities), h2=h2))
        return
    if tls.mode == "DISABLE":
        return
    if tls.mode == "ISTIO_MUTUAL":
        if mesh is None:
            return
        sans = list(tls.subject_alt_names) or list(mesh.identities)
        ctx: tls_pb2.UpstreamTlsContext | None = istio_mutual_upstream(
            tls.sni or mesh.sni or c.name, san_matchers(sans), h2=h2
        )
    else:
        ctx = upstream_tls_context(opts, tls, h2=h2)
    if ctx is None:
        return
    c.transport_socket.name = TLS_TRANSPORT_SOCKET
    c.transport_socket.typed_config.CopyFrom(pack(ctx))


def _auto(c: Cluster, ctx: tls_pb2.UpstreamTlsContext) -> None:
    if c.type == Cluster.ORIGINAL_DST:
        # No endpoint metadata to match on; _auto_mtls checked every endpoint instead.
        c.transport_socket.name = TLS_TRANSPORT_SOCKET
        c.transport_socket.typed_config.CopyFrom(pack(ctx))
        return
    istio = c.transport_socket_matches.add()
    istio.CopyFrom(_ISTIO_MATCH)
    istio.transport_socket.typed_config.CopyFrom(pack(ctx))
    c.transport_socket_matches.add().CopyFrom(_DISABLED_MATCH)


def _matches() -> tuple[TransportSocketMatch, TransportSocketMatch]:
    """Istio's auto-mTLS matches, without the TLS context (built per cluster)."""
    istio = Cluster.TransportSocketMatch(name=ISTIO_MATCH_NAME)
    istio.match.fields[TLS_MODE_MATCH_KEY].string_value = TLS_MODE_ISTIO
    istio.transport_socket.name = TLS_TRANSPORT_SOCKET
    plain = Cluster.TransportSocketMatch(name=DISABLED_MATCH_NAME)
    plain.match.SetInParent()
    plain.transport_socket.name = RAW_BUFFER_TRANSPORT_SOCKET
    plain.transport_socket.typed_config.CopyFrom(pack(raw_buffer_pb2.RawBuffer()))
    return istio, plain


_ISTIO_MATCH, _DISABLED_MATCH = _matches()


def upstream_tls_context(
    opts: HttpProtocolOptions, tls: ClientTLSSettings, *, h2: bool
) -> tls_pb2.UpstreamTlsContext | None:
    """SIMPLE and MUTUAL origination with certificates read from files by Envoy.

    Istio serves the files over SDS through its agent; meshpilot has no agent SDS yet, so
    Envoy reads them directly (no rotation without a config change).
    """
    if tls.credential_name:
        # Istio does not give credentialName to sidecars (every sidecar in scope would
        # wait for a secret it may not be allowed to read); gateways need SDS.
        # TODO(gateways): SDS secret `kubernetes://NAME`.
        return None
    if tls.mode == "MUTUAL" and not (tls.client_certificate and tls.private_key):
        # Istio's validation rejects this rule; it never builds a context for it.
        return None
    ctx = tls_pb2.UpstreamTlsContext(sni=tls.sni)
    common = ctx.common_tls_context
    common.tls_params.tls_minimum_protocol_version = common_pb2.TlsParameters.TLSv1_2
    common.tls_params.tls_maximum_protocol_version = common_pb2.TlsParameters.TLSv1_3
    insecure = bool(tls.insecure_skip_verify)
    _auto_sni_and_san(opts, tls, insecure)
    if tls.mode == "MUTUAL":
        cert = common.tls_certificates.add()
        cert.certificate_chain.filename = tls.client_certificate
        cert.private_key.filename = tls.private_key
    if insecure:
        common.validation_context.SetInParent()
    else:
        vc = common.validation_context
        if tls.ca_certificates:
            vc.trusted_ca.filename = tls.ca_certificates
        else:
            # Istio's "system" root: the operating system's trust store.
            vc.system_root_certs.SetInParent()
        vc.match_typed_subject_alt_names.extend(san_matchers(tls.subject_alt_names))
        if tls.ca_crl:
            vc.crl.filename = tls.ca_crl
    if h2:
        common.alpn_protocols.extend(ALPN_H2)
    return ctx


def _auto_sni_and_san(opts: HttpProtocolOptions, tls: ClientTLSSettings, insecure: bool) -> None:
    """Istio's setAutoSniAndAutoSanValidation: without an explicit SNI, HTTP requests
    use their Host as SNI and the server certificate is checked against it."""
    auto_sni = not tls.sni
    auto_san = auto_sni and not tls.subject_alt_names and not insecure
    if auto_sni:
        opts.upstream_http_protocol_options.auto_sni = True
    if auto_san:
        opts.upstream_http_protocol_options.auto_san_validation = True
