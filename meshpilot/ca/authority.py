"""The certificate authority: a self-signed root or an Istio plug-in intermediate.

Layout of the CA directory (Istio's plug-in names):

- plug-in mode, all four present: `ca-cert.pem` (signing certificate), `ca-key.pem`,
  `root-cert.pem` (one or more roots), `cert-chain.pem` (from `ca-cert.pem` up to the
  root). Files are only read, never written.
- self-signed mode: `ca-cert.pem` (= `root-cert.pem`), `ca-key.pem`, `root-cert.pem`,
  created on first start (key 0600, certificates 0644, directory 0700) and reused.

What a workload certificate carries is decided here, not by the CSR: only the CSR's
public key is used, after the CSR's SANs were checked to be exactly the caller's
identity. Everything else in the CSR (subject, key usages, other extensions) is
ignored.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshpilot.ca.cadir import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    PLUGIN_FILES,
    ROOT_CERT,
    SigningKey,
    Source,
    check_chain,
    check_is_ca,
    check_key_matches,
    parse_certs,
    parse_key,
    parse_one_cert,
    read_bytes,
)
from meshpilot.ca.csr import (
    CAConfigError,
    CAError,
    CsrError,
    IdentityMismatch,
    TtlError,
    check_csr_identity,
    parse_csr,
)
from meshpilot.ca.files import ensure_private_dir, loose_mode, write_atomic
from meshpilot.ca.identity import SpiffeId, check_trust_domain

__all__ = [
    "CAConfigError",
    "CAError",
    "CertificateAuthority",
    "CsrError",
    "IdentityMismatch",
    "TtlError",
]

log = structlog.get_logger(__name__)

DAY = 86400.0
DEFAULT_TTL = DAY
DEFAULT_MAX_TTL = 90 * DAY
ROOT_TTL = 3650 * DAY
# Leaves start a little in the past: a peer whose clock is slightly behind the CA's
# would otherwise reject a fresh certificate as not yet valid.
BACKDATE = 60.0

Mode = Literal["self-signed", "plug-in"]

# --- The authority --------------------------------------------------------------------------


class CertificateAuthority:
    """Signs workload certificates; immutable after loading, so safe to share."""

    def __init__(
        self,
        *,
        trust_domain: str,
        signing_key: SigningKey,
        signing_cert: x509.Certificate,
        chain: Sequence[x509.Certificate],
        roots: Sequence[x509.Certificate],
        mode: Mode,
        default_ttl: float = DEFAULT_TTL,
        max_ttl: float = DEFAULT_MAX_TTL,
        ca_dir: Path | None = None,
    ) -> None:
        if not 0 < default_ttl <= max_ttl:
            raise ValueError("workload certificate TTL must be > 0 and <= the maximum TTL")
        self.trust_domain = check_trust_domain(trust_domain)
        self.mode: Mode = mode
        self.ca_dir = ca_dir
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self._key = signing_key
        self.signing_cert = signing_cert
        self.chain = tuple(chain)
        self.roots = tuple(roots)
        self._hash = _hash_for(signing_key)
        self._issuer = signing_cert.subject
        self._aki = _aki_for(signing_cert)
        self._chain_pems = tuple(_pem(c) for c in self.chain)
        self.root_cert_pem = "".join(_pem(c) for c in self.roots)
        # A leaf must not outlive anything above it: it would fail to verify first.
        self.not_after = min(
            c.not_valid_after_utc for c in (signing_cert, *self.chain, *self._path_roots())
        )

    # Loading.

    @classmethod
    def load_or_create(
        cls,
        ca_dir: Path,
        trust_domain: str = "cluster.local",
        *,
        default_ttl: float = DEFAULT_TTL,
        max_ttl: float = DEFAULT_MAX_TTL,
    ) -> CertificateAuthority:
        """Plug-in mode if all four Istio files exist, else a self-signed root in `ca_dir`."""
        check_trust_domain(trust_domain)
        present = [n for n in PLUGIN_FILES if (ca_dir / n).exists()]
        kw = {"default_ttl": default_ttl, "max_ttl": max_ttl}
        if len(present) == len(PLUGIN_FILES):
            ca = cls._load_plugin(ca_dir, trust_domain, **kw)
        elif not present:
            ca = cls._create_self_signed(ca_dir, trust_domain, **kw)
        elif set(present) == {CA_CERT, CA_KEY, ROOT_CERT}:
            ca = cls._load_self_signed(ca_dir, trust_domain, **kw)
        else:
            missing = [n for n in PLUGIN_FILES if n not in present]
            raise CAConfigError(
                f"{ca_dir}: incomplete CA directory: has {', '.join(present)} but not "
                f"{', '.join(missing)}. Provide all of {', '.join(PLUGIN_FILES)} (plug-in CA) "
                "or an empty directory (a self-signed root is created)"
            )
        log.info(
            "ca loaded",
            mode=ca.mode,
            dir=str(ca_dir),
            trust_domain=trust_domain,
            issuer=ca.signing_cert.subject.rfc4514_string(),
            not_after=ca.not_after.isoformat(),
        )
        return ca

    @classmethod
    def _load_plugin(cls, ca_dir: Path, trust_domain: str, **kw: float) -> CertificateAuthority:
        pems = {name: read_bytes(ca_dir / name) for name in PLUGIN_FILES}
        ca = cls.from_plugin_pems(pems, ca_dir, trust_domain, ca_dir=ca_dir, **kw)
        if loose_mode(ca_dir / CA_KEY):
            log.warning("ca key is readable by group or others", path=str(ca_dir / CA_KEY))
        return ca

    @classmethod
    def from_plugin_pems(
        cls,
        pems: Mapping[str, bytes],
        where: Source,
        trust_domain: str,
        *,
        ca_dir: Path | None = None,
        **kw: float,
    ) -> CertificateAuthority:
        """A plug-in CA from the four Istio PEMs (files of a directory or keys of a
        Secret, named by `where` in errors)."""
        signing_cert = parse_one_cert(pems[CA_CERT], where / CA_CERT)
        key = parse_key(pems[CA_KEY], where / CA_KEY)
        roots = parse_certs(pems[ROOT_CERT], where / ROOT_CERT)
        chain_file = parse_certs(pems[CERT_CHAIN], where / CERT_CHAIN)
        check_key_matches(key, signing_cert, where / CA_KEY, where / CA_CERT)
        check_is_ca(signing_cert, where / CA_CERT)
        for r in roots:
            check_is_ca(r, where / ROOT_CERT)
        root_ders = {r.public_bytes(serialization.Encoding.DER) for r in roots}
        der = signing_cert.public_bytes(serialization.Encoding.DER)
        # cert-chain.pem usually starts with ca-cert.pem (Istio's tooling writes it so)
        # and may end with the root; the root is delivered separately, never in chains.
        chain = [
            c for c in chain_file if c.public_bytes(serialization.Encoding.DER) not in root_ders
        ]
        if not chain or chain[0].public_bytes(serialization.Encoding.DER) != der:
            chain.insert(0, signing_cert)
        check_chain(chain, roots, where)
        return cls(
            trust_domain=trust_domain,
            signing_key=key,
            signing_cert=signing_cert,
            chain=chain,
            roots=roots,
            mode="plug-in",
            ca_dir=ca_dir,
            **kw,
        )

    @classmethod
    def _load_self_signed(
        cls, ca_dir: Path, trust_domain: str, **kw: float
    ) -> CertificateAuthority:
        pems = {name: read_bytes(ca_dir / name) for name in (CA_CERT, CA_KEY, ROOT_CERT)}
        ca = cls.from_self_signed_pems(pems, ca_dir, trust_domain, ca_dir=ca_dir, **kw)
        if loose_mode(ca_dir / CA_KEY):
            log.warning("ca key is readable by group or others", path=str(ca_dir / CA_KEY))
        return ca

    @classmethod
    def from_self_signed_pems(
        cls,
        pems: Mapping[str, bytes],
        where: Source,
        trust_domain: str,
        *,
        ca_dir: Path | None = None,
        **kw: float,
    ) -> CertificateAuthority:
        """A self-signed root from `ca-cert.pem`, `ca-key.pem` and `root-cert.pem`."""
        cert = parse_one_cert(pems[CA_CERT], where / CA_CERT)
        key = parse_key(pems[CA_KEY], where / CA_KEY)
        roots = parse_certs(pems[ROOT_CERT], where / ROOT_CERT)
        check_key_matches(key, cert, where / CA_KEY, where / CA_CERT)
        check_is_ca(cert, where / CA_CERT)
        if cert not in roots:
            raise CAConfigError(
                f"{where / CA_CERT}: not a self-signed root listed in {ROOT_CERT}; an "
                f"intermediate CA also needs {CERT_CHAIN} (Istio's plug-in layout)"
            )
        check_chain([], roots, where)
        return cls(
            trust_domain=trust_domain,
            signing_key=key,
            signing_cert=cert,
            chain=(),
            roots=roots,
            mode="self-signed",
            ca_dir=ca_dir,
            **kw,
        )

    @classmethod
    def _create_self_signed(
        cls, ca_dir: Path, trust_domain: str, **kw: float
    ) -> CertificateAuthority:
        ensure_private_dir(ca_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self_signed_root(key, trust_domain)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Key first and root last: a crash in between leaves an incomplete directory
        # that the next start reports instead of silently replacing a key.
        if not write_atomic(ca_dir / CA_KEY, key_pem, 0o600, exclusive=True):
            raise CAConfigError(f"{ca_dir / CA_KEY}: appeared while creating the CA; retry")
        write_atomic(ca_dir / CA_CERT, cert_pem, 0o644)
        write_atomic(ca_dir / ROOT_CERT, cert_pem, 0o644)
        log.info("ca self-signed root created", dir=str(ca_dir), trust_domain=trust_domain)
        return cls(
            trust_domain=trust_domain,
            signing_key=key,
            signing_cert=cert,
            chain=(),
            roots=(cert,),
            mode="self-signed",
            ca_dir=ca_dir,
            **kw,
        )

    # Signing.

    def sign(
        self,
        csr_pem: str | bytes,
        identity: SpiffeId,
        ttl: float | None = None,
        *,
        now: datetime.datetime | None = None,
    ) -> list[str]:
        """Check the CSR against `identity` and sign it; the chain, leaf first, no root.

        `ttl` in seconds; None or 0 means the default. Raises CsrError,
        IdentityMismatch or TtlError.
        """
        if identity.trust_domain != self.trust_domain:
            raise IdentityMismatch(
                f"identity {identity} is not in trust domain {self.trust_domain}",
                "foreign_identity",
            )
        parsed = parse_csr(csr_pem)
        check_csr_identity(parsed, identity)
        lifetime = self.check_ttl(ttl)
        leaf = self._sign_leaf(parsed.public_key, identity, lifetime, now)
        return [_pem(leaf), *self._chain_pems]

    def check_ttl(self, ttl: float | None) -> float:
        """The lifetime to use for a requested `ttl` (seconds); raises TtlError."""
        if ttl is None or ttl == 0:
            return self.default_ttl
        if ttl < 0:
            raise TtlError(f"requested validity {ttl:g}s is negative", "ttl_negative")
        if ttl > self.max_ttl:
            raise TtlError(
                f"requested TTL {_fmt(ttl)} is greater than the max allowed TTL "
                f"{_fmt(self.max_ttl)}",
                "ttl_too_long",
            )
        return float(ttl)

    def _sign_leaf(
        self,
        public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
        identity: SpiffeId,
        lifetime: float,
        now: datetime.datetime | None,
    ) -> x509.Certificate:
        now = now or datetime.datetime.now(datetime.UTC)
        not_after = min(now + datetime.timedelta(seconds=lifetime), self.not_after)
        not_before = max(now - datetime.timedelta(seconds=BACKDATE), _start(self.signing_cert))
        if not_after <= now:
            raise CAError(
                "the CA certificate has expired; no certificate can be issued", "ca_expired"
            )
        builder = (
            x509.CertificateBuilder()
            # An empty subject makes the SAN the only name, so it must be critical
            # (RFC 5280 4.2.1.6), as in Istio's workload certificates.
            .subject_name(x509.Name([]))
            .issuer_name(self._issuer)
            .public_key(public_key)
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(self._aki, critical=False)
        )
        return builder.sign(self._key, self._hash)

    def issue_server_cert(
        self,
        dns_names: Iterable[str],
        ips: Iterable[str] = (),
        ttl: float | None = None,
    ) -> tuple[list[str], str]:
        """A serving certificate for the control plane itself: (chain PEMs, key PEM).

        The key is generated here and only returned in memory.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(dns_names)]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in dict.fromkeys(ips)]
        if not names:
            raise ValueError("a server certificate needs at least one DNS name or IP")
        now = datetime.datetime.now(datetime.UTC)
        lifetime = ttl if ttl is not None else self.max_ttl
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._issuer)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(
                max(now - datetime.timedelta(seconds=BACKDATE), _start(self.signing_cert))
            )
            .not_valid_after(min(now + datetime.timedelta(seconds=lifetime), self.not_after))
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_LEAF_KEY_USAGE, critical=True)
            .add_extension(_LEAF_EKU, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(self._aki, critical=False)
            .sign(self._key, self._hash)
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return [_pem(cert), *self._chain_pems], key_pem

    # Helpers for callers.

    @property
    def root_expiry(self) -> datetime.datetime:
        """When the first root expires (Istio's root expiry metric uses the first)."""
        return self.roots[0].not_valid_after_utc

    @property
    def chain_expiry(self) -> datetime.datetime:
        """When the signing certificate expires."""
        return self.signing_cert.not_valid_after_utc

    def _path_roots(self) -> list[x509.Certificate]:
        top = self.chain[-1] if self.chain else self.signing_cert
        return [r for r in self.roots if r.subject == top.issuer] or list(self.roots[:1])


# --- Construction helpers -------------------------------------------------------------------

_LEAF_KEY_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_LEAF_EKU = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)


def self_signed_root(
    key: SigningKey, trust_domain: str, *, ttl: float = ROOT_TTL
) -> x509.Certificate:
    """A root like istiod's self-signed one: subject O=<trust domain>, 10 years."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(now - datetime.timedelta(seconds=BACKDATE))
        .not_valid_after(now + datetime.timedelta(seconds=ttl))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, _hash_for(key))
    )


def _serial() -> int:
    # 128 random bits as Istio does; never 0 (RFC 5280 wants a positive serial).
    return secrets.randbits(128) or 1


def _hash_for(key: SigningKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _aki_for(cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        # Istio's sample ca-cert.pem has no SKI: derive the id from its public key.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(cert.public_key())  # type: ignore[arg-type]


def _start(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_before_utc


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _fmt(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h0m0s"
    return f"{seconds:g}s"
