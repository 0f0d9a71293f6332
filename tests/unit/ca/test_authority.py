from __future__ import annotations

import datetime as dt
import ipaddress
import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import DNSName, PolicyBuilder, Store

from meshpilot.ca.authority import (
    CAConfigError,
    CertificateAuthority,
    CsrError,
    IdentityMismatch,
    TtlError,
    self_signed_root,
)
from meshpilot.ca.identity import SpiffeId

from ._helpers import (
    SLEEP,
    copy_plugin_dir,
    csr_pem,
    ec_key,
    istio_samples_certs,
    load_chain,
    openssl_verify,
    tamper_signature,
    verify_with_cryptography,
)

HOUR = 3600.0
DAY = 24 * HOUR


@pytest.fixture
def umask_zero() -> Iterator[None]:
    # Modes must be exact whatever the umask: prove it with the loosest one.
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# --- self-signed root -------------------------------------------------------------------


def test_self_signed_root_created_with_tight_modes(tmp_path: Path, umask_zero: None) -> None:
    d = tmp_path / "ca"
    ca = CertificateAuthority.load_or_create(d)
    assert ca.mode == "self-signed"
    assert sorted(p.name for p in d.iterdir()) == ["ca-cert.pem", "ca-key.pem", "root-cert.pem"]
    assert _mode(d) == 0o700
    assert _mode(d / "ca-key.pem") == 0o600
    assert _mode(d / "ca-cert.pem") == 0o644
    assert _mode(d / "root-cert.pem") == 0o644
    root = x509.load_pem_x509_certificate((d / "root-cert.pem").read_bytes())
    assert root.subject == x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "cluster.local")]
    )
    assert root.issuer == root.subject
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert root.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)
    root.verify_directly_issued_by(root)
    assert ca.root_cert_pem == (d / "root-cert.pem").read_text()


def test_self_signed_root_is_reused_on_restart(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    first = CertificateAuthority.load_or_create(d)
    files = {p.name: p.read_bytes() for p in d.iterdir()}
    second = CertificateAuthority.load_or_create(d)
    assert second.root_cert_pem == first.root_cert_pem
    assert {p.name: p.read_bytes() for p in d.iterdir()} == files
    # A certificate from the first run verifies under the second's root.
    chain = load_chain(first.sign(csr_pem(), SLEEP))
    verify_with_cryptography(chain, second.roots)


def test_existing_loose_dir_is_tightened(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    CertificateAuthority.load_or_create(d)
    assert _mode(d) == 0o700


def test_trust_domain_names_the_root(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "example.org")
    org = ca.roots[0].subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [a.value for a in org] == ["example.org"]
    with pytest.raises(IdentityMismatch):
        ca.sign(csr_pem(), SLEEP)  # SLEEP is in cluster.local


def test_incomplete_directory_is_an_error_naming_the_files(tmp_path: Path) -> None:
    d = tmp_path / "ca"
    d.mkdir()
    src = istio_samples_certs()
    (d / "cert-chain.pem").write_bytes((src / "cert-chain.pem").read_bytes())
    with pytest.raises(CAConfigError, match=r"incomplete.*ca-cert\.pem.*ca-key\.pem"):
        CertificateAuthority.load_or_create(d)
    assert sorted(p.name for p in d.iterdir()) == ["cert-chain.pem"]  # nothing created


def test_intermediate_without_cert_chain_is_an_error(tmp_path: Path) -> None:
    d = copy_plugin_dir(tmp_path / "ca")
    (d / "cert-chain.pem").unlink()
    with pytest.raises(CAConfigError, match=r"cert-chain\.pem"):
        CertificateAuthority.load_or_create(d)


# --- plug-in CA (Istio's samples/certs) -----------------------------------------------


def test_plugin_chain_verifies_through_ca_cert_to_root(tmp_path: Path) -> None:
    d = copy_plugin_dir(tmp_path / "ca")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    ca = CertificateAuthority.load_or_create(d)
    assert ca.mode == "plug-in"
    pems = ca.sign(csr_pem(), SLEEP)
    assert len(pems) == 2
    ca_cert = x509.load_pem_x509_certificate((d / "ca-cert.pem").read_bytes())
    chain = load_chain(pems)
    assert chain[1] == ca_cert
    assert chain[0].issuer == ca_cert.subject
    # The check a user would make: openssl, through ca-cert.pem, to root-cert.pem.
    out = openssl_verify(tmp_path, d / "root-cert.pem", pems[0], d / "ca-cert.pem")
    assert out.strip().endswith("OK")
    sans = verify_with_cryptography(chain, ca.roots, strict=False)
    assert sans == [x509.UniformResourceIdentifier(str(SLEEP))]
    assert ca.root_cert_pem == (d / "root-cert.pem").read_text()
    # Plug-in files are only read.
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_plugin_cert_chain_ending_with_root_is_not_repeated(tmp_path: Path) -> None:
    d = copy_plugin_dir(tmp_path / "ca")
    (d / "cert-chain.pem").write_bytes(
        (d / "ca-cert.pem").read_bytes() + (d / "root-cert.pem").read_bytes()
    )
    ca = CertificateAuthority.load_or_create(d)
    pems = ca.sign(csr_pem(), SLEEP)
    assert len(pems) == 2  # leaf + ca-cert; the root travels separately
    (tmp_path / "served-chain.pem").write_text("".join(pems[1:]))
    openssl_verify(tmp_path, d / "root-cert.pem", pems[0], tmp_path / "served-chain.pem")


def test_plugin_key_mismatch_names_the_key_file(tmp_path: Path) -> None:
    d = copy_plugin_dir(tmp_path / "ca")
    other = rsa.generate_private_key(65537, 2048)
    (d / "ca-key.pem").write_bytes(
        other.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CAConfigError, match=r"ca-key\.pem.*does not match.*ca-cert\.pem"):
        CertificateAuthority.load_or_create(d)


def test_plugin_ca_cert_not_from_root_names_both_files(tmp_path: Path) -> None:
    d = copy_plugin_dir(tmp_path / "ca")
    other_root = self_signed_root(ec_key(), "other.example")
    (d / "root-cert.pem").write_bytes(other_root.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(
        CAConfigError, match=r"ca-cert\.pem.*not signed by any root in .*root-cert\.pem"
    ):
        CertificateAuthority.load_or_create(d)


@pytest.mark.parametrize("name", ["root-cert.pem", "ca-cert.pem", "ca-key.pem", "cert-chain.pem"])
def test_plugin_garbage_file_is_named(tmp_path: Path, name: str) -> None:
    d = copy_plugin_dir(tmp_path / "ca")
    (d / name).write_text("not a pem file\n")
    with pytest.raises(CAConfigError, match=name.replace(".", r"\.")):
        CertificateAuthority.load_or_create(d)


def test_plugin_signing_cert_must_be_a_ca(tmp_path: Path) -> None:
    d = copy_plugin_dir(tmp_path / "ca")
    ca = CertificateAuthority.load_or_create(d)
    key = ec_key()
    leaf = load_chain(ca.sign(csr_pem(key), SLEEP))[0]
    (d / "ca-cert.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (d / "cert-chain.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (d / "ca-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CAConfigError, match=r"ca-cert\.pem: not a CA certificate"):
        CertificateAuthority.load_or_create(d)


# --- workload certificates ------------------------------------------------------------


def test_leaf_carries_exactly_the_spiffe_identity(ca: CertificateAuthority) -> None:
    key = ec_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])
    leaf = load_chain(ca.sign(csr_pem(key, subject=subject), SLEEP))[0]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert list(san.value) == [
        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/sleep")
    ]
    assert leaf.subject == x509.Name([])
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment
    assert not (ku.key_cert_sign or ku.crl_sign or ku.content_commitment or ku.key_agreement)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    root_ski = ca.roots[0].extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == root_ski.digest
    assert leaf.public_key() == key.public_key()
    # Web-PKI-strict path validation accepts it as a client certificate.
    verify_with_cryptography([leaf], ca.roots, strict=True)


def test_serials_are_random_128_bit(ca: CertificateAuthority) -> None:
    csr = csr_pem()
    serials = {load_chain(ca.sign(csr, SLEEP))[0].serial_number for _ in range(40)}
    assert len(serials) == 40
    assert all(0 < s < 2**128 for s in serials)
    assert max(s.bit_length() for s in serials) > 120


def test_default_requested_and_maximum_ttl(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", default_ttl=DAY, max_ttl=90 * DAY)
    now = dt.datetime.now(dt.UTC)

    def lifetime(ttl: float | None) -> float:
        leaf = load_chain(ca.sign(csr_pem(), SLEEP, ttl, now=now))[0]
        return (leaf.not_valid_after_utc - now).total_seconds()

    assert abs(lifetime(None) - DAY) < 2
    assert abs(lifetime(0) - DAY) < 2
    assert abs(lifetime(HOUR) - HOUR) < 2
    assert abs(lifetime(90 * DAY) - 90 * DAY) < 2
    with pytest.raises(TtlError, match="greater than the max allowed TTL 2160h"):
        ca.sign(csr_pem(), SLEEP, 90 * DAY + 1)
    with pytest.raises(TtlError, match="negative"):
        ca.sign(csr_pem(), SLEEP, -5)


def test_leaf_never_outlives_the_ca(tmp_path: Path) -> None:
    key = ec_key()
    root = self_signed_root(key, "cluster.local", ttl=2 * HOUR)
    ca = CertificateAuthority(
        trust_domain="cluster.local",
        signing_key=key,
        signing_cert=root,
        chain=(),
        roots=(root,),
        mode="self-signed",
    )
    leaf = load_chain(ca.sign(csr_pem(), SLEEP, DAY))[0]
    assert leaf.not_valid_after_utc == root.not_valid_after_utc


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(lambda: rsa.generate_private_key(65537, 2048), id="rsa2048"),
        pytest.param(lambda: rsa.generate_private_key(65537, 3072), id="rsa3072"),
        pytest.param(lambda: ec_key(ec.SECP384R1()), id="p384"),
    ],
)
def test_accepted_workload_keys(ca: CertificateAuthority, key: object) -> None:
    k = key()  # type: ignore[operator]
    leaf = load_chain(ca.sign(csr_pem(k), SLEEP))[0]
    assert leaf.public_key() == k.public_key()


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        pytest.param(lambda: rsa.generate_private_key(65537, 1024), "weak_key", id="rsa1024"),
        pytest.param(lambda: rsa.generate_private_key(3, 2048), "key", id="rsa-e3"),
        pytest.param(lambda: ec_key(ec.SECP521R1()), "key", id="p521"),
        pytest.param(lambda: ec_key(ec.SECP256K1()), "key", id="secp256k1"),
        pytest.param(lambda: ed25519.Ed25519PrivateKey.generate(), "key", id="ed25519"),
    ],
)
def test_refused_workload_keys(ca: CertificateAuthority, key: object, reason: str) -> None:
    with pytest.raises(CsrError) as e:
        ca.sign(csr_pem(key()), SLEEP)  # type: ignore[operator]
    assert e.value.reason == reason


@pytest.mark.parametrize(
    ("csr", "reason"),
    [
        pytest.param(lambda: "", "pem", id="empty"),
        pytest.param(lambda: "garbage", "pem", id="garbage"),
        pytest.param(
            lambda: (
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
            ),
            "pem",
            id="bad-der",
        ),
        pytest.param(lambda: csr_pem() + csr_pem(), "pem", id="two-blocks"),
        pytest.param(lambda: tamper_signature(csr_pem()), "signature", id="bad-signature"),
        pytest.param(lambda: csr_pem(ca=True), "ca", id="ca-true"),
        pytest.param(lambda: csr_pem(uri=None), "no_identity", id="no-san"),
        pytest.param(lambda: "x" * (64 * 1024 + 1), "too_large", id="oversized"),
    ],
)
def test_invalid_csrs(ca: CertificateAuthority, csr: object, reason: str) -> None:
    with pytest.raises(CsrError) as e:
        ca.sign(csr(), SLEEP)  # type: ignore[operator]
    assert e.value.reason == reason


def test_sha1_signed_csr_is_refused(ca: CertificateAuthority, tmp_path: Path) -> None:
    # cryptography refuses to sign with SHA-1; the openssl CLI still can.
    key = tmp_path / "k.pem"
    key.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    done = subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-sha1",
            "-key",
            str(key),
            "-subj",
            "/",
            "-addext",
            f"subjectAltName=URI:{SLEEP}",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    with pytest.raises(CsrError) as e:
        ca.sign(done.stdout, SLEEP)
    assert e.value.reason == "signature"


OWN = x509.UniformResourceIdentifier(str(SLEEP))


@pytest.mark.parametrize(
    ("sans", "reason"),
    [
        pytest.param(
            [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/admin")],
            "foreign_identity",
            id="foreign-sa",
        ),
        pytest.param(
            [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/sleep")],
            "foreign_identity",
            id="foreign-ns",
        ),
        pytest.param(
            [x509.UniformResourceIdentifier("spiffe://evil.org/ns/default/sa/sleep")],
            "foreign_identity",
            id="foreign-td",
        ),
        pytest.param(
            [OWN, x509.DNSName("reviews.default.svc.cluster.local")], "extra_san", id="dns"
        ),
        pytest.param(
            [OWN, x509.UniformResourceIdentifier("spiffe://cluster.local/ns/default/sa/admin")],
            "extra_san",
            id="second-uri",
        ),
        pytest.param([OWN, x509.IPAddress(ipaddress.ip_address("10.0.0.1"))], "extra_san", id="ip"),
        pytest.param([OWN, x509.RFC822Name("a@example.org")], "extra_san", id="email"),
        pytest.param([OWN, OWN], "extra_san", id="duplicate"),
        pytest.param([x509.DNSName("sleep")], "extra_san", id="dns-only"),
    ],
)
def test_sans_must_be_exactly_the_callers_identity(
    ca: CertificateAuthority, sans: list[x509.GeneralName], reason: str
) -> None:
    with pytest.raises(IdentityMismatch) as e:
        ca.sign(csr_pem(sans=sans), SLEEP)
    assert e.value.reason == reason


def test_identity_in_another_trust_domain_is_refused(ca: CertificateAuthority) -> None:
    other = SpiffeId("evil.org", "default", "sleep")
    with pytest.raises(IdentityMismatch):
        ca.sign(csr_pem(uri=str(other)), other)


def test_server_certificate_for_the_control_plane(ca: CertificateAuthority) -> None:
    pems, key_pem = ca.issue_server_cert(
        ["istiod.istio-system.svc", "localhost"], ["127.0.0.1"], HOUR
    )
    cert = load_chain(pems)[0]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["istiod.istio-system.svc", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == []
    key = serialization.load_pem_private_key(key_pem.encode(), None)
    assert key.public_key() == cert.public_key()
    verifier = (
        PolicyBuilder()
        .store(Store(list(ca.roots)))
        .build_server_verifier(DNSName("istiod.istio-system.svc"))
    )
    verifier.verify(cert, [])
