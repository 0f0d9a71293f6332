"""Checking a workload CSR, and the CA's errors (each maps to one gRPC status).

Only the CSR's public key is ever used by the CA; the rest is inspected to refuse
requests that ask for more than the caller may have (a CA certificate, names that
are not the caller's identity, weak keys).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshpilot.ca.identity import SpiffeId

MAX_CSR_BYTES = 64 * 1024

# Accepted workload keys. P-384 is accepted because Istio's agent can be told to use
# it (ECC_CURVE) and BoringSSL/Envoy handle it; P-521, Ed25519 and DSA are refused
# because Envoy's default TLS settings cannot use them.
EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "secp256r1": ec.SECP256R1,
    "secp384r1": ec.SECP384R1,
}
MIN_RSA_BITS = 2048
# An upper bound too: a huge modulus costs the CA time to parse and verify.
MAX_RSA_BITS = 8192
_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)

# --- Errors: the servicer maps each class to one gRPC status ------------------------------


class CAError(Exception):
    """Base class; `reason` is a short stable token for metrics and tests."""

    reason = "error"

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class CAConfigError(CAError, ValueError):
    """The CA directory cannot be used; the message names the file."""

    reason = "config"


class CsrError(CAError):
    """The CSR is malformed or asks for something never granted (INVALID_ARGUMENT)."""

    reason = "csr"


class IdentityMismatch(CAError):
    """The CSR names an identity other than the caller's (PERMISSION_DENIED)."""

    reason = "foreign_identity"


class TtlError(CAError):
    """The requested validity is not acceptable (INVALID_ARGUMENT)."""

    reason = "ttl"


# --- CSR inspection -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedCsr:
    """What the CA takes from a CSR after checking it."""

    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
    uris: tuple[str, ...]
    other_sans: tuple[str, ...]  # descriptions only, for the error message


def parse_csr(csr_pem: str | bytes) -> ParsedCsr:
    """Parse and check a PEM PKCS#10 request; raises CsrError."""
    data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"CSR is {len(data)} bytes, above the {MAX_CSR_BYTES} limit", "too_large")
    if data.count(b"-----BEGIN ") != 1 or b"CERTIFICATE REQUEST-----" not in data:
        raise CsrError("CSR must be exactly one PEM 'CERTIFICATE REQUEST' block", "pem")
    try:
        csr = x509.load_pem_x509_csr(data)
    except (ValueError, TypeError) as e:
        raise CsrError(f"CSR does not parse: {short_error(e)}", "pem") from e
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CsrError(f"CSR public key is not usable: {short_error(e)}", "key") from e
    check_workload_key(public_key)
    try:
        algo = csr.signature_hash_algorithm
    except UnsupportedAlgorithm as e:
        raise CsrError("CSR signature algorithm is not supported", "signature") from e
    if not isinstance(algo, _CSR_HASHES):
        name = algo.name if algo is not None else "none"
        raise CsrError(f"CSR signed with {name}; SHA-256/384/512 required", "signature")
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as e:
        raise CsrError(f"CSR signature cannot be checked: {short_error(e)}", "signature") from e
    if not valid:
        raise CsrError("CSR signature does not verify with its own public key", "signature")
    try:
        extensions = csr.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as e:
        raise CsrError(f"CSR extensions do not parse: {short_error(e)}", "extensions") from e
    uris: list[str] = []
    others: list[str] = []
    for ext in extensions:
        if isinstance(ext.value, x509.BasicConstraints) and ext.value.ca:
            raise CsrError("CSR asks for a CA certificate (basicConstraints CA:TRUE)", "ca")
        if isinstance(ext.value, x509.SubjectAlternativeName):
            for name in ext.value:
                if isinstance(name, x509.UniformResourceIdentifier):
                    uris.append(name.value)
                else:
                    others.append(_describe_name(name))
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return ParsedCsr(public_key, tuple(uris), tuple(others))


def check_workload_key(key: object) -> None:
    """ECDSA P-256/P-384 or RSA 2048..8192 with e=65537; raises CsrError."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in EC_CURVES:
            raise CsrError(
                f"ECDSA curve {key.curve.name} is not accepted; use P-256 or P-384", "key"
            )
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrError(
                f"RSA key of {key.key_size} bits is too weak; at least {MIN_RSA_BITS} required",
                "weak_key",
            )
        if key.key_size > MAX_RSA_BITS:
            raise CsrError(f"RSA key of {key.key_size} bits is above {MAX_RSA_BITS}", "key")
        if key.public_numbers().e != 65537:
            raise CsrError("RSA public exponent must be 65537", "key")
        return
    raise CsrError(
        f"{type(key).__name__.lstrip('_')} keys are not accepted; use ECDSA P-256 or RSA 2048",
        "key",
    )


def check_csr_identity(parsed: ParsedCsr, identity: SpiffeId) -> None:
    """The CSR's SANs must be exactly one URI: the caller's own SPIFFE ID."""
    own = str(identity)
    if not parsed.uris and not parsed.other_sans:
        raise CsrError(f"CSR has no SAN; it must carry the URI SAN {own}", "no_identity")
    if any(u != own for u in parsed.uris) and own not in parsed.uris:
        raise IdentityMismatch(
            f"CSR asks for an identity other than the caller's ({own})", "foreign_identity"
        )
    if parsed.other_sans or len(parsed.uris) != 1:
        extra = [*parsed.other_sans, *(f"URI:{u}" for u in parsed.uris if u != own)]
        if len(parsed.uris) > 1 and not extra:
            extra = ["duplicate URI"]
        raise IdentityMismatch(f"CSR has SANs besides {own}: {', '.join(extra)[:200]}", "extra_san")


def _describe_name(name: x509.GeneralName) -> str:
    kind = {
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "email",
        x509.DirectoryName: "dirName",
        x509.RegisteredID: "RID",
        x509.OtherName: "otherName",
    }.get(type(name), type(name).__name__)
    return f"{kind}:{name.value}"[:80]


def short_error(e: BaseException) -> str:
    return str(e).splitlines()[0][:160] if str(e) else type(e).__name__
