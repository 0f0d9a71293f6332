"""Mesh TLS contexts: Istio's ISTIO_MUTUAL upstream context, the inbound mTLS context,
and Sidecar ingress TLS with file certificates.

Workload certificates come over SDS from the agent beside Envoy, exactly as Istio's:
secret `default` (certificate chain and key) and `ROOTCA` (trust bundle), from the
bootstrap's `sds-grpc` cluster (meshpilot/agent/bootstrap.py defines it and
meshpilot/agent/sds.py serves both names).

Unlike Istio's, a meshpilot proxy may run without the agent (`meshpilot bootstrap`
alone): it has no `sds-grpc` cluster, and Envoy rejects every cluster or listener that
names one, the whole CDS or LDS update with it. Such proxies get no SDS reference at
all (`proxy_has_sds`): no mesh mTLS out, plaintext in, and STRICT ports closed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2

from meshpilot.api.networking import ServerTLSSettings
from meshpilot.model.proxy import Proxy
from meshpilot.translators.common import bool_value, duration, is_ip

SDS_CLUSTER = "sds-grpc"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"

TLS_TRANSPORT_SOCKET = "envoy.transport_sockets.tls"
RAW_BUFFER_TRANSPORT_SOCKET = "envoy.transport_sockets.raw_buffer"

# Outbound ALPN of mesh mTLS (Istio's ALPNInMeshWithMxc / ALPNInMeshH2WithMxc): "istio"
# tells a PERMISSIVE server that the client is a sidecar.
ALPN_IN_MESH = ("istio-peer-exchange", "istio")
ALPN_IN_MESH_H2 = ("istio-peer-exchange", "istio", "h2")
# Inbound filter chains of PERMISSIVE ports match these (Istio's allIstioMtlsALPNs).
ALL_ISTIO_MTLS_ALPNS = (
    "istio",
    "istio-peer-exchange",
    "istio-http/1.0",
    "istio-http/1.1",
    "istio-h2",
)
# What the server negotiates: never "istio" itself, which would hide the real protocol
# (Istio's ALPNHttp and ALPNDownstreamWithMxc).
ALPN_DOWNSTREAM_HTTP = ("h2", "http/1.1")
ALPN_DOWNSTREAM_TCP = ("istio-peer-exchange", "h2", "http/1.1")

# Istio's SupportedCiphers for sidecar servers.
SUPPORTED_CIPHERS = (
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "AES256-GCM-SHA384",
    "AES128-GCM-SHA256",
)

TlsParameters: TypeAlias = common_pb2.TlsParameters
_TLS_VERSIONS = {
    "TLS_AUTO": TlsParameters.TLS_AUTO,
    "TLSV1_0": TlsParameters.TLSv1_0,
    "TLSV1_1": TlsParameters.TLSv1_1,
    "TLSV1_2": TlsParameters.TLSv1_2,
    "TLSV1_3": TlsParameters.TLSv1_3,
}


# Labels and metadata that say a proxy runs beside the agent's SDS server.
TLS_MODE_LABEL = "security.istio.io/tlsMode"
SDS_METADATA = "SDS"


def proxy_has_sds(proxy: Proxy) -> bool:
    """Whether `proxy` has the agent's `sds-grpc` cluster: node metadata `SDS: "true"`
    (Istio's old flag), an xDS connection over mTLS (`controlPlaneAuthPolicy:
    MUTUAL_TLS`, which needs the agent's certificate), or Istio's sidecar label
    `security.istio.io/tlsMode: istio` on the workload."""
    meta = proxy.metadata
    if str(meta.get(SDS_METADATA, "")).lower() == "true":
        return True
    config = meta.get("PROXY_CONFIG")
    if isinstance(config, dict) and config.get("controlPlaneAuthPolicy") == "MUTUAL_TLS":
        return True
    return proxy.labels.get(TLS_MODE_LABEL) == "istio"


def sds_config_source() -> config_source_pb2.ConfigSource:
    """The agent's SDS over `sds-grpc`; no initial fetch timeout, so a listener or
    cluster never goes live without its certificate (Istio's defaultSDSConfig)."""
    return config_source_pb2.ConfigSource(
        api_config_source=config_source_pb2.ApiConfigSource(
            api_type=config_source_pb2.ApiConfigSource.GRPC,
            transport_api_version=config_source_pb2.V3,
            set_node_on_first_message_only=True,
            grpc_services=[
                grpc_service_pb2.GrpcService(
                    envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=SDS_CLUSTER)
                )
            ],
        ),
        initial_fetch_timeout=duration(0),
        resource_api_version=config_source_pb2.V3,
    )


def sds_secret(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=sds_config_source())


# Built once and copied: every mesh mTLS cluster and chain carries both.
_WORKLOAD_SDS = sds_secret(WORKLOAD_SECRET)
_ROOT_SDS = sds_secret(ROOT_SECRET)


def spiffe_san_matchers(uris: Iterable[str]) -> list[common_pb2.SubjectAltNameMatcher]:
    """Exact URI SAN matchers (typed: Envoy deprecates the untyped form)."""
    SAN = common_pb2.SubjectAltNameMatcher
    return [SAN(san_type=SAN.URI, matcher=string_pb2.StringMatcher(exact=u)) for u in uris]


def _workload_identity(
    common: tls_pb2.CommonTlsContext, sans: list[common_pb2.SubjectAltNameMatcher]
) -> None:
    """Istio's ApplyToCommonTLSContext: present `default`, verify the peer against
    `ROOTCA` (and `sans`, when there are any)."""
    common.tls_certificate_sds_secret_configs.add().CopyFrom(_WORKLOAD_SDS)
    combined = common.combined_validation_context
    combined.default_validation_context.SetInParent()
    combined.default_validation_context.match_typed_subject_alt_names.extend(sans)
    combined.validation_context_sds_secret_config.CopyFrom(_ROOT_SDS)


def istio_mutual_upstream(
    sni: str, sans: list[common_pb2.SubjectAltNameMatcher], *, h2: bool
) -> tls_pb2.UpstreamTlsContext:
    """ISTIO_MUTUAL origination (Istio's buildUpstreamClusterTLSContext)."""
    ctx = tls_pb2.UpstreamTlsContext(sni=sni)
    common = ctx.common_tls_context
    common.tls_params.tls_minimum_protocol_version = TlsParameters.TLSv1_2
    common.tls_params.tls_maximum_protocol_version = TlsParameters.TLSv1_3
    _workload_identity(common, sans)
    common.alpn_protocols.extend(ALPN_IN_MESH_H2 if h2 else ALPN_IN_MESH)
    return ctx


def inbound_mtls(*, http: bool) -> tls_pb2.DownstreamTlsContext:
    """Inbound mesh mTLS (Istio's BuildInboundTLS): a client certificate signed by the
    mesh root is required; any mesh identity is accepted here, AuthorizationPolicy
    decides which may call."""
    ctx = tls_pb2.DownstreamTlsContext(require_client_certificate=bool_value(True))
    common = ctx.common_tls_context
    common.alpn_protocols.extend(ALPN_DOWNSTREAM_HTTP if http else ALPN_DOWNSTREAM_TCP)
    params = common.tls_params
    params.cipher_suites.extend(SUPPORTED_CIPHERS)
    params.tls_minimum_protocol_version = TlsParameters.TLSv1_2
    params.tls_maximum_protocol_version = TlsParameters.TLSv1_3
    _workload_identity(common, [])
    return ctx


SIDECAR_INGRESS_TLS_MODES = frozenset({"SIMPLE", "MUTUAL"})


def sidecar_ingress_tls(
    settings: ServerTLSSettings, *, http: bool
) -> tls_pb2.DownstreamTlsContext | None:
    """Sidecar `ingress[].tls`: terminate with the files it names. SIMPLE serves the
    certificate; MUTUAL also requires a client certificate signed by caCertificates.
    None for what a sidecar cannot do with files (see meshpilot/analysis)."""
    if settings.mode not in SIDECAR_INGRESS_TLS_MODES or settings.credential_name:
        return None
    if not (settings.server_certificate and settings.private_key):
        return None
    mutual = settings.mode == "MUTUAL"
    if mutual and not settings.ca_certificates:
        return None
    ctx = tls_pb2.DownstreamTlsContext()
    common = ctx.common_tls_context
    cert = common.tls_certificates.add()
    cert.certificate_chain.filename = settings.server_certificate
    cert.private_key.filename = settings.private_key
    params = common.tls_params
    params.tls_minimum_protocol_version = _TLS_VERSIONS.get(
        settings.min_protocol_version.upper(), TlsParameters.TLSv1_2
    )
    if params.tls_minimum_protocol_version == TlsParameters.TLS_AUTO:
        params.tls_minimum_protocol_version = TlsParameters.TLSv1_2
    params.tls_maximum_protocol_version = _TLS_VERSIONS.get(
        settings.max_protocol_version.upper(), TlsParameters.TLSv1_3
    )
    if params.tls_maximum_protocol_version == TlsParameters.TLS_AUTO:
        params.tls_maximum_protocol_version = TlsParameters.TLSv1_3
    params.cipher_suites.extend(settings.cipher_suites or SUPPORTED_CIPHERS)
    if http:
        common.alpn_protocols.extend(ALPN_DOWNSTREAM_HTTP)
    if mutual:
        ctx.require_client_certificate.CopyFrom(bool_value(True))
        vc = common.validation_context
        vc.trusted_ca.filename = settings.ca_certificates
        if settings.ca_crl:
            vc.crl.filename = settings.ca_crl
        vc.match_typed_subject_alt_names.extend(san_matchers(settings.subject_alt_names))
        vc.verify_certificate_spki.extend(settings.verify_certificate_spki)
        vc.verify_certificate_hash.extend(settings.verify_certificate_hash)
    return ctx


def san_matchers(names: Iterable[str]) -> list[common_pb2.SubjectAltNameMatcher]:
    """Exact SAN matchers, typed by what each name looks like (URI, IP or DNS)."""
    SAN = common_pb2.SubjectAltNameMatcher
    out = []
    for name in names:
        if "://" in name:
            san_type = SAN.URI
        elif is_ip(name):
            san_type = SAN.IP_ADDRESS
        else:
            san_type = SAN.DNS
        out.append(SAN(san_type=san_type, matcher=string_pb2.StringMatcher(exact=name)))
    return out
