"""Reading and checking the CA's PEM material; every error names where it came from.

The material is the CA directory's files or, in a cluster, the keys of a Secret with the
same names (`Secret istio-system/cacerts`, `ca-cert.pem`, ...): `SecretKeys` names a
Secret's keys the way a directory's Path names its files, so one set of checks serves both.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshpilot.ca.csr import EC_CURVES, MIN_RSA_BITS, CAConfigError, short_error

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
ROOT_CERT = "root-cert.pem"
CERT_CHAIN = "cert-chain.pem"
PLUGIN_FILES = (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN)
# Tolerated clock difference when checking that CA certificates are already valid.
CLOCK_SKEW = 60.0

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class SecretKeys:
    """Where CA material in a Secret lives: `SecretKeys(ns, name) / "ca-key.pem"` is the
    label `Secret ns/name key ca-key.pem` that errors carry."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace = namespace
        self.name = name

    def __truediv__(self, key: str) -> str:
        return f"{self} key {key}"

    def __str__(self) -> str:
        return f"Secret {self.namespace}/{self.name}"


# A directory or a Secret; `where / name` names one file or key.
Source = Path | SecretKeys
Where = Path | str


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CAConfigError(f"{path}: cannot read: {e.strerror or e}") from e


def read_certs(path: Path) -> list[x509.Certificate]:
    return parse_certs(read_bytes(path), path)


def parse_certs(data: bytes, where: Where) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CAConfigError(f"{where}: not PEM certificates: {short_error(e)}") from e
    if not certs:
        raise CAConfigError(f"{where}: no certificate found")
    return certs


def one_cert(path: Path) -> x509.Certificate:
    return parse_one_cert(read_bytes(path), path)


def parse_one_cert(data: bytes, where: Where) -> x509.Certificate:
    certs = parse_certs(data, where)
    if len(certs) != 1:
        raise CAConfigError(f"{where}: expected exactly one certificate, found {len(certs)}")
    return certs[0]


def load_key(path: Path) -> SigningKey:
    return parse_key(read_bytes(path), path)


def parse_key(data: bytes, path: Where) -> SigningKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as e:
        raise CAConfigError(f"{path}: encrypted private keys are not supported") from e
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CAConfigError(f"{path}: not a PEM private key: {short_error(e)}") from e
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise CAConfigError(f"{path}: RSA key of {key.key_size} bits; at least 2048 required")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in EC_CURVES:
        return key
    raise CAConfigError(f"{path}: CA key must be RSA >= 2048 or ECDSA P-256/P-384")


def check_key_matches(
    key: SigningKey, cert: x509.Certificate, key_path: Where, cert_path: Where
) -> None:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*fmt) != cert.public_key().public_bytes(*fmt):
        raise CAConfigError(
            f"{key_path}: private key does not match the certificate in {cert_path}"
        )


def check_is_ca(cert: x509.Certificate, path: Where) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CAConfigError(f"{path}: not a CA certificate (basicConstraints CA:TRUE missing)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not ku.key_cert_sign:
        raise CAConfigError(f"{path}: key usage does not allow signing certificates")


def check_chain(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], ca_dir: Source
) -> None:
    """Each chain element is issued by the next; the last by a root; all in validity."""
    now = datetime.datetime.now(datetime.UTC)
    names = {0: CA_CERT}
    for i, cert in enumerate([*chain, *roots]):
        where = ca_dir / (names.get(i) or (CERT_CHAIN if i < len(chain) else ROOT_CERT))
        if cert.not_valid_after_utc <= now:
            raise CAConfigError(
                f"{where}: certificate {cert.subject.rfc4514_string()!r} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d}"
            )
        if cert.not_valid_before_utc > now + datetime.timedelta(seconds=CLOCK_SKEW):
            raise CAConfigError(
                f"{where}: certificate {cert.subject.rfc4514_string()!r} is not valid before "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M}"
            )
    for i in range(len(chain) - 1):
        check_issued(
            chain[i],
            chain[i + 1],
            ca_dir / (CA_CERT if i == 0 else CERT_CHAIN),
            ca_dir / CERT_CHAIN,
        )
    for root in roots:
        try:
            root.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CAConfigError(
                f"{ca_dir / ROOT_CERT}: {root.subject.rfc4514_string()!r} is not a self-signed root"
            ) from e
    if not chain:
        return
    top = chain[-1]
    for root in roots:
        try:
            top.verify_directly_issued_by(root)
            return
        except (ValueError, TypeError, InvalidSignature):
            continue
    where = ca_dir / (CA_CERT if len(chain) == 1 else CERT_CHAIN)
    raise CAConfigError(
        f"{where}: {top.subject.rfc4514_string()!r} is not signed by any root in "
        f"{ca_dir / ROOT_CERT} (issuer {top.issuer.rfc4514_string()!r})"
    )


def check_issued(
    child: x509.Certificate, parent: x509.Certificate, child_path: Where, parent_path: Where
) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise CAConfigError(
            f"{child_path}: {child.subject.rfc4514_string()!r} is not issued by "
            f"{parent.subject.rfc4514_string()!r} from {parent_path}"
        ) from e
    check_is_ca(parent, parent_path)
