"""The certificate helper process: one key per certificate, the CA asked with the token
or the current certificate, the answer checked against that key, and every way the
helper can fail is an error that names it (so the certificate manager retries), never a
hang or a key the agent cannot use."""

from __future__ import annotations

import io
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshpilot.agent import keys, pki
from meshpilot.agent.caclient import CAClient, CAError, ClientIdentity
from meshpilot.agent.pkiclient import PkiHelper, PkiHelperError

from . import _fakeca

IDENTITY = "spiffe://cluster.local/ns/default/sa/client"


@pytest.fixture
async def ca() -> AsyncIterator[tuple[_fakeca.FakeCA, int]]:
    fake = _fakeca.FakeCA(tokens={"tok": IDENTITY})
    server, port = await _fakeca.start(fake)
    try:
        yield fake, port
    finally:
        await server.stop(None)


def client(ca: tuple[_fakeca.FakeCA, int], tmp_path: Path, token: str = "tok") -> CAClient:
    (tmp_path / "token").write_text(token + "\n")
    return CAClient(f"127.0.0.1:{ca[1]}", ca[0].root_pem, tmp_path / "token")


@pytest.mark.parametrize(
    ("key_type", "kind"), [("ec", ec.EllipticCurvePrivateKey), ("rsa", rsa.RSAPrivateKey)]
)
async def test_helper_issues_a_new_key_with_the_token_then_renews_with_the_certificate(
    key_type: keys.KeyType, kind: type, ca: tuple[_fakeca.FakeCA, int], tmp_path: Path
) -> None:
    c = client(ca, tmp_path)
    async with PkiHelper(key_type, IDENTITY) as helper:
        got = await helper.issue(c, 60, {"WorkloadName": "w"})
    assert helper.process is None  # ended
    key = serialization.load_pem_private_key(got.key_pem, None)
    assert isinstance(key, kind)
    assert got.key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    leaf = x509.load_pem_x509_certificate(got.chain[0].encode())
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert leaf.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
    assert got.info.uris == (IDENTITY,)
    assert 50 <= got.info.lifetime <= 70
    assert ca[0].metadata_seen[-1].get("WorkloadName") == "w"

    # Renewal: no token any more, the CA on a port that insists on client certificates.
    (tmp_path / "token").unlink()
    server, port = await _fakeca.start(ca[0], require_client_auth=True)
    c.address = f"127.0.0.1:{port}"
    chain_pem = "".join(c if c.endswith("\n") else c + "\n" for c in got.chain).encode()
    try:
        async with PkiHelper(key_type, IDENTITY) as helper:
            again = await helper.issue(c, 60, {}, ClientIdentity(got.key_pem, chain_pem))
    finally:
        await server.stop(None)
    assert again.key_pem != got.key_pem  # a new key for every certificate
    assert [i.auth for i in ca[0].issued] == ["token", "cert"]


async def test_ca_refusals_keep_their_message_and_code(
    ca: tuple[_fakeca.FakeCA, int], tmp_path: Path
) -> None:
    c = client(ca, tmp_path, token="wrong")
    async with PkiHelper("ec", IDENTITY) as helper:
        with pytest.raises(CAError) as e:
            await helper.issue(c, 60, {})
    assert e.value.code is not None and e.value.code.name == "UNAUTHENTICATED"
    assert "wrong" not in str(e.value)  # the token never reaches messages


async def test_an_answer_that_does_not_fit_the_key_is_a_value_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What pki.check_chain refuses (tests/unit/agent/test_keys.py) reaches the
    # certificate manager as the ValueError it retries on.
    reply = {"error": "the CA returned a certificate for another key", "check": True}
    script = f"import sys; sys.stdin.readline(); print({json.dumps(reply)!r}, flush=True)"
    monkeypatch.setattr(PkiHelper, "argv", (sys.executable, "-c", script))
    async with PkiHelper("ec", IDENTITY) as helper:
        with pytest.raises(ValueError, match="another key") as e:
            await helper.issue(fake_client(), 60, {})
    assert not isinstance(e.value, PkiHelperError)


def fake_client() -> CAClient:
    return CAClient("127.0.0.1:1", b"root", None)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("import sys; sys.exit(3)", "exited with status 3"),
        ("import sys; sys.stdin.readline(); print('nonsense', flush=True)", "not JSON"),
        ("import sys; sys.stdin.readline(); print('[1]', flush=True)", "not a JSON object"),
        ("import sys; sys.stdin.readline(); sys.stdout.write('x' * 9000000)", "limit"),
        (
            "import sys, json; sys.stdin.readline();"
            "print(json.dumps({'error': 'request field ttl: expected an integer'}), flush=True)",
            "request field ttl",
        ),
        (
            "import sys, json; sys.stdin.readline();"
            "info = {'serial': '1', 'uris': []};"
            "print(json.dumps({'key_pem': 'k', 'chain': ['c'], 'info': info}))",
            "not_before",
        ),
    ],
)
async def test_a_broken_helper_is_an_error_naming_it(
    script: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PkiHelper, "argv", (sys.executable, "-c", script))
    async with PkiHelper("ec", IDENTITY) as helper:
        with pytest.raises(PkiHelperError, match=message):
            await helper.issue(fake_client(), 60, {})


async def test_a_missing_interpreter_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PkiHelper, "argv", ("/nonexistent/python", "-m", "meshpilot.agent.pki"))
    with pytest.raises(PkiHelperError, match="/nonexistent/python"):
        async with PkiHelper("ec", IDENTITY):
            pass


def run_helper(request: object) -> tuple[int, list[dict[str, Any]]]:
    stdin = io.BytesIO(json.dumps(request).encode() + b"\n")
    stdout = io.BytesIO()
    code = pki.serve(stdin, stdout)
    return code, [json.loads(line) for line in stdout.getvalue().splitlines()]


GOOD: dict[str, Any] = {
    "key_type": "ec",
    "identity": IDENTITY,
    "ttl": 60,
    "metadata": {},
    "ca": {"address": "127.0.0.1:1", "root_cert": "PEM", "token_file": None},
    "renew_with": None,
    "log": {"format": "json", "level": "error"},
}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("key_type", "dsa"),
        ("identity", None),
        ("ttl", "60"),
        ("metadata", []),
        ("ca", {"address": "x"}),
        ("renew_with", {"key_pem": 1}),
        ("log", None),
    ],
)
def test_helper_side_refuses_malformed_requests_naming_the_field(field: str, value: object) -> None:
    code, replies = run_helper({**GOOD, field: value})
    assert code == 2
    assert replies == [{"error": replies[0]["error"]}]
    assert replies[0]["error"].startswith(f"request field {field}: expected")


def test_helper_side_bounds_its_input_and_exits_at_end_of_input(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The agent stopped before asking: nothing to do.
    assert pki.serve(io.BytesIO(b""), io.BytesIO()) == 0
    monkeypatch.setattr(pki, "MAX_LINE", 100)
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        run_helper({**GOOD, "identity": "x" * 200})
