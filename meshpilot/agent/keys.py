"""Workload keys, CSRs and certificate facts for the agent.

The private key is generated here, written only into the agent's private workdir
(0600 file in a 0700 directory) and handed to Envoy over the SDS unix socket; it never
travels to the CA, and nothing in this module logs or formats it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

KeyType = Literal["ec", "rsa"]
KEY_TYPES: tuple[KeyType, ...] = ("ec", "rsa")
RSA_BITS = 2048
# Longest path a unix socket can bind (sun_path is 108 bytes with the trailing NUL).
MAX_SOCKET_PATH = 107


class AgentSetupError(ValueError):
    """The agent cannot start as configured; the message says what to change."""


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """`spiffe://TD/ns/NS/sa/SA`, Istio's workload identity."""
    for what, value in (
        ("trust domain", trust_domain),
        ("namespace", namespace),
        ("service account", service_account),
    ):
        if not value or "/" in value or any(c.isspace() for c in value):
            raise AgentSetupError(f"{what} {value!r}: must be non-empty, without '/' or spaces")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def generate_key(key_type: KeyType = "ec") -> PrivateKey:
    """A fresh ECDSA P-256 (default) or RSA 2048 key, as Istio's agent generates."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    raise AgentSetupError(f"key type {key_type!r}: expected one of {', '.join(KEY_TYPES)}")


def key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: Envoy reads it inline over the 0600 SDS socket."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def build_csr(key: PrivateKey, identity: str) -> bytes:
    """A PEM CSR whose only SAN is the URI `identity`, with an empty subject (as Istio)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    builder = builder.add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What the agent logs and schedules by: never key material."""

    serial: str  # hex, as openssl prints it
    not_before: datetime
    not_after: datetime
    uris: tuple[str, ...]

    @property
    def lifetime(self) -> float:
        return (self.not_after - self.not_before).total_seconds()


def cert_info(pem: bytes | str) -> CertInfo:
    """Facts about the first (leaf) certificate of a PEM chain."""
    data = pem.encode() if isinstance(pem, str) else pem
    cert = x509.load_pem_x509_certificate(data)
    uris: tuple[str, ...] = ()
    with contextlib.suppress(x509.ExtensionNotFound):
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = tuple(ext.value.get_values_for_type(x509.UniformResourceIdentifier))
    return CertInfo(
        serial=f"{cert.serial_number:x}",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        uris=uris,
    )


def check_chain(chain: list[str], key: PrivateKey, identity: str) -> CertInfo:
    """Refuse a CA answer that Envoy could not use: wrong key, wrong or extra identity."""
    if not chain or not all(isinstance(c, str) and c.strip() for c in chain):
        raise ValueError("the CA returned an empty certificate chain")
    try:
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
    except ValueError as e:
        raise ValueError(f"the CA returned a leaf that is not a PEM certificate: {e}") from e
    if _spki(leaf.public_key()) != _spki(key.public_key()):
        raise ValueError("the CA returned a certificate for another key")
    info = cert_info(chain[0])
    if info.uris != (identity,):
        raise ValueError(f"the CA returned URI SANs {list(info.uris)}, expected [{identity!r}]")
    return info


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- files ----------------------------------------------------------------------------


def ensure_private_dir(path: Path) -> Path:
    """Create `path` with mode 0700, or accept it only if it is ours and not a symlink.

    An existing directory with group/other bits is tightened (it is ours); one owned by
    another user is refused, since that user could swap our key or socket.
    """
    path = path.absolute()
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as e:
        raise AgentSetupError(f"--workdir {path}: cannot create it: {e.strerror}") from e
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise AgentSetupError(f"--workdir {path}: not a directory (symlinks are refused)")
    if st.st_uid != os.geteuid():
        raise AgentSetupError(f"--workdir {path}: owned by uid {st.st_uid}, not by us")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def write_private_file(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically replace `path` with `data`, created with `mode` from the first byte.

    The temporary file is created O_EXCL with the final mode, so the key is never
    readable by others, not even for an instant, and a reader never sees half a file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_socket_path(path: Path) -> str:
    """The path as a string, or a clear error when it is too long for a unix socket."""
    text = str(path)
    if len(text.encode()) > MAX_SOCKET_PATH:
        raise AgentSetupError(
            f"--workdir: the SDS socket path {text} is {len(text.encode())} bytes, longer "
            f"than a unix socket allows ({MAX_SOCKET_PATH}); choose a shorter --workdir"
        )
    return text
