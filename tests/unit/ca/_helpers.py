"""Real X.509 material for CA tests: CSRs of every kind, Istio's sample certificates."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store

from meshpilot.ca.identity import SpiffeId
from tests.samples import ISTIO_SAMPLES

SLEEP = SpiffeId("cluster.local", "default", "sleep")
PLUGIN_FILES = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")

AnyKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def istio_samples_certs() -> Path:
    """Istio's plug-in CA test files (`tests/data/istio-samples/samples/certs`)."""
    certs = ISTIO_SAMPLES / "certs"
    if not certs.is_dir():
        pytest.fail(f"Istio's sample certificates not found at {certs}", pytrace=False)
    return certs


def copy_plugin_dir(dest: Path) -> Path:
    """A private copy of Istio's plug-in files (the originals are read-only)."""
    src = istio_samples_certs()
    dest.mkdir(parents=True, exist_ok=True)
    for name in PLUGIN_FILES:
        shutil.copyfile(src / name, dest / name)
        (dest / name).chmod(0o600 if name == "ca-key.pem" else 0o644)
    return dest


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def csr_pem(
    key: AnyKey | None = None,
    *,
    sans: Sequence[x509.GeneralName] | None = None,
    uri: str | None = str(SLEEP),
    ca: bool | None = None,
    subject: x509.Name | None = None,
) -> str:
    """A signed PKCS#10 request; by default ECDSA P-256 with SLEEP's URI SAN."""
    key = key or ec_key()
    names = (
        list(sans) if sans is not None else ([x509.UniformResourceIdentifier(uri)] if uri else [])
    )
    b = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.PEM).decode()


def tamper_signature(pem: str) -> str:
    """The same CSR with one bit of its signature flipped (still parses)."""
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01
    csr = x509.load_der_x509_csr(bytes(der))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def load_chain(pems: Sequence[str]) -> list[x509.Certificate]:
    return [x509.load_pem_x509_certificate(p.encode()) for p in pems]


def verify_with_cryptography(
    chain: Sequence[x509.Certificate], roots: Sequence[x509.Certificate], *, strict: bool = True
) -> list[x509.GeneralName]:
    """Path validation with `cryptography`'s verifier; the leaf's SANs on success.

    `strict=False` relaxes extension rules for Istio's 2018 sample CA, whose
    basicConstraints is not critical and which has no key identifiers; signatures,
    names, validity and CA flags are still checked.
    """
    builder = PolicyBuilder().store(Store(list(roots))).time(dt.datetime.now(dt.UTC))
    if not strict:
        ca_policy = ExtensionPolicy.permit_all().require_present(
            x509.BasicConstraints, Criticality.AGNOSTIC, None
        )
        builder = builder.extension_policies(
            ca_policy=ca_policy, ee_policy=ExtensionPolicy.permit_all()
        )
    verified = builder.build_client_verifier().verify(chain[0], list(chain[1:]))
    return list(verified.subjects or [])


def openssl_verify(tmp: Path, root: Path, leaf_pem: str, untrusted: Path | None = None) -> str:
    """`openssl verify -CAfile root [-untrusted ca-cert] leaf`; returns its output."""
    leaf = tmp / "leaf.pem"
    leaf.write_text(leaf_pem)
    argv = ["openssl", "verify", "-CAfile", str(root)]
    if untrusted is not None:
        argv += ["-untrusted", str(untrusted)]
    argv.append(str(leaf))
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
    return done.stdout
