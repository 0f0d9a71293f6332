"""The key helper process: one key and CSR per certificate, the CA's answer checked
against that key, and every way the helper can fail is an error that names it (so the
certificate manager retries), never a hang or a key the agent cannot use."""

from __future__ import annotations

import io
import json
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from meshpilot.agent import keys, pki
from meshpilot.agent.pkiclient import PkiHelper, PkiHelperError

from .test_rotation import self_signed

IDENTITY = "spiffe://cluster.local/ns/default/sa/client"


@pytest.mark.parametrize(
    ("key_type", "kind"), [("ec", ec.EllipticCurvePrivateKey), ("rsa", rsa.RSAPrivateKey)]
)
async def test_helper_makes_a_key_and_csr_and_checks_the_chain_for_that_key(
    key_type: keys.KeyType, kind: type
) -> None:
    async with PkiHelper(key_type, IDENTITY) as helper:
        key_pem, csr_pem = await helper.new_key()
        key = serialization.load_pem_private_key(key_pem, None)
        assert isinstance(key, kind)
        assert key_pem.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        assert csr.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [IDENTITY]
        info = await helper.check_chain([self_signed(key, [IDENTITY], ttl=60)])  # type: ignore[arg-type]
    assert info.uris == (IDENTITY,)
    assert 59 <= info.lifetime <= 61
    assert helper.process is None  # ended


async def test_a_chain_for_another_key_is_refused_with_the_reason() -> None:
    async with PkiHelper("ec", IDENTITY) as helper:
        await helper.new_key()
        other = self_signed(pki.generate_key(), [IDENTITY], ttl=60)
        with pytest.raises(ValueError, match="another key"):
            await helper.check_chain([other])


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("import sys; sys.exit(3)", "exited with status 3"),
        ("import sys; sys.stdin.readline(); print('nonsense', flush=True)", "not JSON"),
        ("import sys; sys.stdin.readline(); print('[1]', flush=True)", "not a JSON object"),
        ("import sys; sys.stdin.readline(); print('x' * 70000, flush=True)", "limit"),
        (
            "import sys, json; sys.stdin.readline();"
            "print(json.dumps({'error': 'no entropy'}), flush=True)",
            "no entropy",
        ),
    ],
)
async def test_a_broken_helper_is_an_error_naming_it(
    script: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(PkiHelper, "argv", (sys.executable, "-c", script))
    async with PkiHelper("ec", IDENTITY) as helper:
        with pytest.raises(PkiHelperError, match=message):
            await helper.new_key()


async def test_a_missing_interpreter_is_an_error_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(PkiHelper, "argv", ("/nonexistent/python", "-m", "meshpilot.agent.pki"))
    with pytest.raises(PkiHelperError, match="/nonexistent/python"):
        async with PkiHelper("ec", IDENTITY):
            pass


async def test_facts_that_do_not_parse_are_a_helper_error(monkeypatch: pytest.MonkeyPatch) -> None:
    script = (
        "import sys, json; sys.stdin.readline();"
        "print(json.dumps({'key_pem': 'k', 'csr_pem': 'c'}), flush=True); sys.stdin.readline();"
        "print(json.dumps({'info': {'serial': '1', 'uris': []}}), flush=True)"
    )
    monkeypatch.setattr(PkiHelper, "argv", (sys.executable, "-c", script))
    async with PkiHelper("ec", IDENTITY) as helper:
        await helper.new_key()
        with pytest.raises(PkiHelperError, match="not_before"):
            await helper.check_chain(["x"])


def run_helper(*requests: object) -> list[dict[str, object]]:
    stdin = io.BytesIO(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
    stdout = io.BytesIO()
    pki.serve(stdin, stdout)
    return [json.loads(line) for line in stdout.getvalue().splitlines()]


def test_helper_side_refuses_bad_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "expected key_type" in str(run_helper({"key_type": "dsa", "identity": IDENTITY}))
    assert "expected key_type" in str(run_helper({"key_type": "ec"}))
    replies = run_helper({"key_type": "ec", "identity": IDENTITY}, {"chain": "x"})
    assert replies[1] == {"error": "chain: expected a list of PEM certificates"}
    replies = run_helper({"key_type": "ec", "identity": IDENTITY}, {"chain": ["garbage"]})
    assert "not a PEM certificate" in str(replies[1]["error"])
    # The agent gave up (closed the pipe) after the CSR: the helper just exits.
    assert len(run_helper({"key_type": "ec", "identity": IDENTITY})) == 1
    monkeypatch.setattr(pki, "MAX_LINE", 100)
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        run_helper({"key_type": "ec", "identity": "x" * 200})
