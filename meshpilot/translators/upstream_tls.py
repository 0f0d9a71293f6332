"""TLS origination for outbound clusters: a DestinationRule's `tls` block.

DISABLE: nothing. SIMPLE and MUTUAL: an UpstreamTlsContext whose CA, client certificate
and key are files Envoy reads itself (Istio serves them over SDS through its agent).
ISTIO_MUTUAL and `credentialName` need the security work (issue 4): hooks below.
"""

from __future__ import annotations

import ipaddress

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2

from meshpilot.api.networking import ClientTLSSettings
from meshpilot.translators.common import pack

Cluster = cluster_pb2.Cluster
HttpProtocolOptions = http_protocol_options_pb2.HttpProtocolOptions

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
ALPN_H2 = ("h2",)


def apply_tls(
    c: Cluster,
    opts: HttpProtocolOptions,
    tls: ClientTLSSettings | None,
    *,
    h2: bool,
) -> None:
    """Set the cluster's transport socket for a DestinationRule `tls` block."""
    if tls is None or tls.mode == "DISABLE":
        return
    if tls.mode == "ISTIO_MUTUAL":
        ctx = istio_mutual_tls_context(c.name, tls, h2=h2)
    else:
        ctx = upstream_tls_context(opts, tls, h2=h2)
    if ctx is None:
        return
    c.transport_socket.name = TLS_TRANSPORT_SOCKET
    c.transport_socket.typed_config.CopyFrom(pack(ctx))


def istio_mutual_tls_context(
    cluster_name: str, tls: ClientTLSSettings, *, h2: bool
) -> tls_pb2.UpstreamTlsContext | None:
    """ISTIO_MUTUAL: mesh mTLS with the workload certificate over SDS.

    TODO(issue 4): SDS `default`/`ROOTCA`, SNI `outbound_.PORT_.SUBSET_.HOST`, ALPN
    `istio-peer-exchange`, auto-mTLS. Until then the cluster stays plaintext.
    """
    del cluster_name, tls, h2
    return None


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
        # TODO(issue 4): gateways: SDS secret `kubernetes://NAME`.
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


def san_matchers(names: list[str]) -> list[common_pb2.SubjectAltNameMatcher]:
    """Exact SAN matchers, typed by what each name looks like."""
    SAN = common_pb2.SubjectAltNameMatcher
    out = []
    for name in names:
        if "://" in name:
            san_type = SAN.URI
        elif _is_ip(name):
            san_type = SAN.IP_ADDRESS
        else:
            san_type = SAN.DNS
        out.append(SAN(san_type=san_type, matcher=string_pb2.StringMatcher(exact=name)))
    return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
