from __future__ import annotations

import base64
import json
import stat
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from meshpilot.ca.auth import (
    AuthenticationError,
    CallCredentials,
    TokenAuthenticator,
    authenticate,
    bearer_token,
)
from meshpilot.ca.tokens import SECRET_FILE, TokenError, TokenSigner
from meshpilot.cli import main

NOW = 1_800_000_000.0


@pytest.fixture
def signer(tmp_path: Path) -> TokenSigner:
    return TokenSigner.from_ca_dir(tmp_path / "ca")


def _segments(token: str) -> list[str]:
    return token.split(".")


def _decode(seg: str) -> dict[str, object]:
    return json.loads(base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4)))


def _encode(obj: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_round_trip_and_claims(signer: TokenSigner) -> None:
    token = signer.create("default", "sleep", 3600, now=NOW)
    claims = signer.verify(token, now=NOW + 10)
    assert (claims.namespace, claims.service_account) == ("default", "sleep")
    assert claims.expires_at == int(NOW) + 3600
    header, payload, _ = _segments(token)
    assert _decode(header)["alg"] == "HS256"
    body = _decode(payload)
    assert body["sub"] == "system:serviceaccount:default:sleep"
    assert body["aud"] == "istio-ca"
    assert body["iss"] == "meshpilot-ca"
    assert isinstance(body["jti"], str) and len(body["jti"]) == 32
    assert signer.create("default", "sleep", 3600, now=NOW) != token  # fresh jti


def test_secret_file_is_private_and_reused(tmp_path: Path) -> None:
    a = TokenSigner.from_ca_dir(tmp_path / "ca")
    path = tmp_path / "ca" / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    b = TokenSigner.from_ca_dir(tmp_path / "ca")
    assert b.verify(a.create("ns1", "sa1", 60))


def test_expired_and_not_yet_valid(signer: TokenSigner) -> None:
    token = signer.create("default", "sleep", 60, now=NOW)
    with pytest.raises(TokenError, match="expired"):
        signer.verify(token, now=NOW + 60)
    with pytest.raises(TokenError, match="not yet valid"):
        signer.verify(token, now=NOW - 3600)


def test_foreign_token_is_refused(signer: TokenSigner, tmp_path: Path) -> None:
    other = TokenSigner.from_ca_dir(tmp_path / "other")
    with pytest.raises(TokenError, match="not issued by this CA"):
        signer.verify(other.create("default", "sleep", 60))


def test_tampered_payload_is_refused(signer: TokenSigner) -> None:
    header, payload, sig = _segments(signer.create("default", "sleep", 60))
    body = _decode(payload)
    body["sub"] = "system:serviceaccount:kube-system:admin"
    with pytest.raises(TokenError, match="bad token signature"):
        signer.verify(f"{header}.{_encode(body)}.{sig}")


@pytest.mark.parametrize(
    "change",
    [{"aud": "kubernetes"}, {"aud": ["other"]}, {"iss": "someone"}, {"sub": "user:alice"}],
)
def test_wrong_claims_are_refused_even_when_signed(
    signer: TokenSigner, change: dict[str, object]
) -> None:
    _, payload, _ = _segments(signer.create("default", "sleep", 60))
    token = signer.sign({**_decode(payload), **change})
    with pytest.raises(TokenError):
        signer.verify(token)


def test_alg_none_is_refused(signer: TokenSigner) -> None:
    _, payload, _ = _segments(signer.create("default", "sleep", 60))
    with pytest.raises(TokenError, match="algorithm"):
        signer.verify(f"{_encode({'alg': 'none', 'typ': 'JWT'})}.{payload}.")


@pytest.mark.parametrize(
    "token",
    ["", "abc", "a.b", "a.b.c.d", "!!!.###.$$$", "e30.e30.e30", "x" * 5000, "é.é.é"],
)
def test_malformed_tokens(signer: TokenSigner, token: str) -> None:
    with pytest.raises(TokenError):
        signer.verify(token)


def test_token_errors_never_echo_the_token(signer: TokenSigner) -> None:
    token = signer.create("default", "sleep", 60, now=NOW)
    with pytest.raises(TokenError) as e:
        signer.verify(token, now=NOW + 120)
    assert token not in str(e.value) and _segments(token)[2] not in str(e.value)


def test_create_validates_names_and_ttl(signer: TokenSigner) -> None:
    with pytest.raises(ValueError, match="namespace"):
        signer.create("Bad NS", "sleep", 60)
    with pytest.raises(ValueError, match="TTL"):
        signer.create("default", "sleep", 0)


def test_authenticator_reads_bearer_metadata(signer: TokenSigner) -> None:
    auth = TokenAuthenticator(signer, "cluster.local")
    token = signer.create("default", "sleep", 60)
    caller = authenticate([auth], CallCredentials({"authorization": f"Bearer {token}"}))
    assert str(caller.identity) == "spiffe://cluster.local/ns/default/sa/sleep"
    assert auth.authenticate(CallCredentials({})) is None
    with pytest.raises(AuthenticationError, match="Bearer"):
        bearer_token({"authorization": f"Basic {token}"})
    with pytest.raises(AuthenticationError, match="no credential"):
        authenticate([auth], CallCredentials({}))
    # Two authorization headers are ambiguous.
    meta = CallCredentials.metadata_from([("authorization", f"Bearer {token}")] * 2)
    with pytest.raises(AuthenticationError):
        authenticate([auth], CallCredentials(meta))


def test_cli_token_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca_dir = tmp_path / "ca"
    argv = ["token", "create", "--ca-dir", str(ca_dir), "--namespace", "default"]
    assert main([*argv, "--service-account", "sleep", "--ttl", "2h"]) == 0
    token = capsys.readouterr().out.strip()
    claims = TokenSigner.from_ca_dir(ca_dir).verify(token)
    assert claims.service_account == "sleep"
    assert claims.expires_at - claims.issued_at == 7200
    assert main([*argv, "--service-account", "Not_Valid"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "service account" in captured.err


def test_cli_token_create_as_a_process(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "meshpilot",
            "token",
            "create",
            "--ca-dir",
            str(tmp_path),
            "--namespace",
            "ns",
            "--service-account",
            "sa",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert TokenSigner.from_ca_dir(tmp_path, create=False).verify(done.stdout.strip())


@pytest.mark.parametrize("claim", ["nbf", "jti", "iat", "exp", "sub", "iss", "aud"])
def test_every_claim_is_required(signer: TokenSigner, claim: str) -> None:
    _, payload, _ = _segments(signer.create("default", "sleep", 60))
    body = _decode(payload)
    del body[claim]
    with pytest.raises(TokenError, match=f"no '{claim}' claim"):
        signer.verify(signer.sign(body))


# PyJWT warns that 32 bytes is short for SHA-512: this token is the forgery under test.
@pytest.mark.filterwarnings("ignore:The HMAC key")
def test_other_hmac_algorithms_are_refused_even_under_our_secret(signer: TokenSigner) -> None:
    _, payload, _ = _segments(signer.create("default", "sleep", 60))
    token = jwt.encode(_decode(payload), signer._secret, algorithm="HS512")
    with pytest.raises(TokenError, match="algorithm"):
        signer.verify(token)


def test_tokens_are_standard_jwts(signer: TokenSigner) -> None:
    # Any JWT library reads them: PyJWT with the secret checks signature and claims.
    token = signer.create("default", "sleep", 3600)
    body = jwt.decode(token, signer._secret, algorithms=["HS256"], audience="istio-ca")
    assert body["sub"] == "system:serviceaccount:default:sleep"
    assert jwt.get_unverified_header(token)["kid"] == signer.key_id
