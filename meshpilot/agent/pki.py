"""The agent's cryptography: workload keys, CSRs, and checks of what the CA returned.

Run as `python -m meshpilot.agent.pki`, it is the short-lived helper the agent starts
for each certificate (meshpilot/agent/pkiclient.py): Istio's Go agent links its crypto
into one small binary, but in Python `cryptography` (its own OpenSSL, its Rust
bindings, ~50 modules) would cost ~15 MB of resident memory for the agent's whole life,
to be used for a few milliseconds a day. The helper does one exchange, one JSON object
per line on stdin and stdout, then exits:

    -> {"key_type": "ec", "identity": "spiffe://..."}
    <- {"key_pem": "...", "csr_pem": "..."}
    -> {"chain": ["-----BEGIN CERTIFICATE-----...", ...]}
    <- {"info": {"serial": ..., "not_before": ..., "not_after": ..., "uris": [...]}}
       or {"error": "the CA returned a certificate for another key"}

The key travels only over this private pipe to the agent, which serves it over SDS.
"""

from __future__ import annotations

import contextlib
import json
import sys
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from meshpilot.agent import keys

# One request line: the CA client caps the CA's answer at 4 MiB; JSON at most doubles
# PEM text (each newline becomes two bytes).
MAX_LINE = 2 * 4 * 1024 * 1024 + 4096

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def generate_key(key_type: keys.KeyType = "ec") -> PrivateKey:
    """A fresh ECDSA P-256 (default) or RSA 2048 key, as Istio's agent generates."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=keys.RSA_BITS)
    raise keys.AgentSetupError(
        f"key type {key_type!r}: expected one of {', '.join(keys.KEY_TYPES)}"
    )


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


def cert_info(pem: bytes | str) -> keys.CertInfo:
    """Facts about the first (leaf) certificate of a PEM chain."""
    data = pem.encode() if isinstance(pem, str) else pem
    cert = x509.load_pem_x509_certificate(data)
    uris: tuple[str, ...] = ()
    with contextlib.suppress(x509.ExtensionNotFound):
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = tuple(ext.value.get_values_for_type(x509.UniformResourceIdentifier))
    return keys.CertInfo(
        serial=f"{cert.serial_number:x}",
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        uris=uris,
    )


def check_chain(chain: list[str], key: PrivateKey, identity: str) -> keys.CertInfo:
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


# --- the helper process ----------------------------------------------------------------


def _read(stdin: IO[bytes]) -> dict[str, Any] | None:
    """The next request, None at end of input (the agent gave up on this exchange)."""
    line = stdin.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE:
        raise ValueError(f"request longer than {MAX_LINE} bytes")
    request = json.loads(line)
    if not isinstance(request, dict):
        raise ValueError("request: expected a JSON object")
    return request


def _write(stdout: IO[bytes], reply: dict[str, Any]) -> None:
    stdout.write(json.dumps(reply).encode() + b"\n")
    stdout.flush()


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """One key, its CSR, and the check of the chain the CA returned for it."""
    request = _read(stdin)
    if request is None:
        return 0
    key_type, identity = request.get("key_type"), request.get("identity")
    if not isinstance(identity, str) or key_type not in keys.KEY_TYPES:
        _write(stdout, {"error": f"expected key_type in {keys.KEY_TYPES} and an identity"})
        return 2
    key = generate_key(key_type)
    _write(stdout, {"key_pem": key_pem(key).decode(), "csr_pem": build_csr(key, identity).decode()})
    request = _read(stdin)
    if request is None:
        return 0
    chain = request.get("chain")
    if not isinstance(chain, list):
        _write(stdout, {"error": "chain: expected a list of PEM certificates"})
        return 2
    try:
        info = check_chain(chain, key, identity)
    except ValueError as e:
        _write(stdout, {"error": str(e)})
        return 0
    _write(stdout, {"info": info.to_json()})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(serve(sys.stdin.buffer, sys.stdout.buffer))
