"""A small in-test CA that follows the CSR contract the agent relies on.

It is a protocol double, not the mesh CA: TLS with a server certificate for
`istiod.istio-system.svc`, bearer-token or client-certificate authentication, exactly
one URI SAN equal to the caller's identity, `validity_duration` honoured, chain leaf
first without the root. It records what it saw so tests can assert on it.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID

from meshpilot.protos import istio_ca_pb2

SERVER_SAN = "istiod.istio-system.svc"


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Issued:
    identity: str
    serial: int
    ttl: int
    auth: str  # "token" or "cert"


@dataclass
class FakeCA:
    """Root key and cert, a serving cert, and the accepted tokens (token -> identity)."""

    tokens: dict[str, str] = field(default_factory=dict)
    max_ttl: int = 90 * 24 * 3600
    fail_next: int = 0  # answer UNAVAILABLE this many times
    accept_client_certs: bool = True
    issued: list[Issued] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    metadata_seen: list[dict[str, Any]] = field(default_factory=list)
    requests: int = 0  # every CreateCertificate call, answered or not

    def __post_init__(self) -> None:
        now = dt.datetime.now(dt.UTC)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fake-ca")])
        self.root = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.root_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .sign(self.root_key, hashes.SHA256())
        )
        self.root_pem = _pem(self.root)
        self.server_key = ec.generate_private_key(ec.SECP256R1())
        self.server_cert = self._sign(
            self.server_key.public_key(),
            x509.SubjectAlternativeName([x509.DNSName(SERVER_SAN)]),
            3600,
        )

    def _sign(
        self, public_key: Any, san: x509.SubjectAlternativeName, ttl: int
    ) -> x509.Certificate:
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.root.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(seconds=ttl))
            .add_extension(san, critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.root_key, hashes.SHA256())
        )

    def server_credentials(self, require_client_auth: bool = False) -> grpc.ServerCredentials:
        """grpcio either never asks for a client certificate or insists on one; the
        mesh CA has its own TLS front for "verify if given", this double uses two ports."""
        key = self.server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return grpc.ssl_server_credentials(
            [(key, _pem(self.server_cert))],
            root_certificates=self.root_pem,
            require_client_auth=require_client_auth,
        )

    # --- the service -------------------------------------------------------------------

    async def CreateCertificate(
        self, request: istio_ca_pb2.IstioCertificateRequest, context: grpc.aio.ServicerContext
    ) -> istio_ca_pb2.IstioCertificateResponse:
        self.requests += 1
        if self.fail_next > 0:
            self.fail_next -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "fake CA told to fail")
        caller, how = self._authenticate(context)
        if caller is None:
            self.refused.append("unauthenticated")
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no valid token or client cert")
        try:
            csr = x509.load_pem_x509_csr(request.csr.encode())
        except ValueError:
            self.refused.append("bad csr")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "garbage CSR")
        san = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        if list(san) != [x509.UniformResourceIdentifier(caller)] or uris != [caller]:
            self.refused.append("foreign identity")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "SAN is not the caller")
        ttl = min(int(request.validity_duration) or 3600, self.max_ttl)
        self.metadata_seen.append(dict(request.metadata))
        leaf = self._sign(csr.public_key(), san, ttl)
        self.issued.append(Issued(caller, leaf.serial_number, ttl, how))
        return istio_ca_pb2.IstioCertificateResponse(cert_chain=[_pem(leaf).decode()])

    def _authenticate(self, context: grpc.aio.ServicerContext) -> tuple[str | None, str]:
        auth = context.auth_context()
        peer_pem = (auth.get("x509_pem_cert") or [b""])[0]
        if peer_pem and self.accept_client_certs:
            # gRPC verified the chain against our root; the identity is its URI SAN.
            cert = x509.load_pem_x509_certificate(peer_pem)
            ext = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
            uris = ext.value.get_values_for_type(x509.UniformResourceIdentifier)
            if len(uris) == 1 and cert.not_valid_after_utc > dt.datetime.now(dt.UTC):
                return uris[0], "cert"
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and value.startswith("Bearer "):
                return self.tokens.get(value.removeprefix("Bearer ")), "token"
        return None, ""


async def start(
    ca: FakeCA, address: str = "127.0.0.1:0", *, require_client_auth: bool = False
) -> tuple[grpc.aio.Server, int]:
    """Serve `ca` over TLS; returns the server and its port."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        "istio.v1.auth.IstioCertificateService",
        {
            "CreateCertificate": grpc.unary_unary_rpc_method_handler(
                ca.CreateCertificate,
                request_deserializer=istio_ca_pb2.IstioCertificateRequest.FromString,
                response_serializer=istio_ca_pb2.IstioCertificateResponse.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(address, ca.server_credentials(require_client_auth))
    await server.start()
    return server, port
