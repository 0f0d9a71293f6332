"""The agent's certificate work: key, CSR, the CA call, and the check of the answer.

Run as `python -m meshpilot.agent.pki`, it is the short-lived helper the agent starts
for each certificate (meshpilot/agent/pkiclient.py). Istio's Go agent links all this
into one small binary; in Python, `cryptography` (its own OpenSSL, its Rust bindings,
~50 modules, ~15 MB of resident memory) and gRPC's TLS client code (~2 MB of pages
touched) would stay in the agent's memory for its whole life, to be used for a few
milliseconds a day. The helper answers one request, one JSON object per line on stdin
and stdout, then exits:

    -> {"key_type": "ec", "identity": "spiffe://...", "ttl": 86400, "metadata": {...},
        "ca": {"address": "host:port", "root_cert": "PEM", "token_file": "path" | null},
        "renew_with": {"key_pem": ..., "chain_pem": ...} | null,
        "log": {"format": "json", "level": "info"}}
    <- {"key_pem": "...", "chain": ["PEM", ...], "info": {"serial": ..., ...}}
       or {"error": "...", "ca_code": "UNAUTHENTICATED" | null}   (the CA call failed)
       or {"error": "the CA returned a certificate for another key", "check": true}

The keys travel only over this private pipe between the agent and its helper.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import IO, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from meshpilot.agent import keys, logfmt
from meshpilot.agent.caclient import CAClient, CAError, ClientIdentity

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


def _request_error(request: dict[str, Any]) -> str | None:
    """What is wrong with an issue request, None if nothing."""
    ca, renew, log = request.get("ca"), request.get("renew_with"), request.get("log")
    checks = (
        ("key_type", request.get("key_type") in keys.KEY_TYPES, f"one of {keys.KEY_TYPES}"),
        ("identity", isinstance(request.get("identity"), str), "a string"),
        ("ttl", isinstance(request.get("ttl"), int), "an integer"),
        ("metadata", isinstance(request.get("metadata"), dict), "an object"),
        (
            "ca",
            isinstance(ca, dict)
            and isinstance(ca.get("address"), str)
            and isinstance(ca.get("root_cert"), str)
            and isinstance(ca.get("token_file"), str | None),
            "address, root_cert and token_file",
        ),
        (
            "renew_with",
            renew is None
            or (
                isinstance(renew, dict)
                and all(isinstance(renew.get(k), str) for k in ("key_pem", "chain_pem"))
            ),
            "null or key_pem and chain_pem",
        ),
        (
            "log",
            isinstance(log, dict) and all(isinstance(log.get(k), str) for k in ("format", "level")),
            "format and level",
        ),
    )
    for field, ok, expected in checks:
        if not ok:
            return f"request field {field}: expected {expected}"
    return None


def issue(request: dict[str, Any]) -> dict[str, Any]:
    """The reply to one issue request (see the module doc)."""
    error = _request_error(request)
    if error is not None:
        return {"error": error}
    logfmt.configure(request["log"]["format"], request["log"]["level"])
    identity: str = request["identity"]
    key = generate_key(request["key_type"])
    ca = request["ca"]
    client = CAClient(
        ca["address"],
        ca["root_cert"].encode(),
        Path(ca["token_file"]) if ca["token_file"] is not None else None,
    )
    renew = request["renew_with"]
    renew_with = (
        ClientIdentity(renew["key_pem"].encode(), renew["chain_pem"].encode()) if renew else None
    )
    try:
        chain = asyncio.run(
            client.create_certificate(
                build_csr(key, identity),
                request["ttl"],
                request["metadata"],
                renew_with=renew_with,
            )
        )
    except CAError as e:
        return {"error": str(e), "ca_code": e.code.name if e.code is not None else None}
    try:
        info = check_chain(chain, key, identity)
    except ValueError as e:
        return {"error": str(e), "check": True}
    return {"key_pem": key_pem(key).decode(), "chain": chain, "info": info.to_json()}


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> int:
    """Answer one request; 0 unless the request itself was malformed."""
    request = _read(stdin)
    if request is None:
        return 0  # the agent stopped before asking
    reply = issue(request)
    _write(stdout, reply)
    return 2 if "error" in reply and "ca_code" not in reply and "check" not in reply else 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(serve(sys.stdin.buffer, sys.stdout.buffer))
