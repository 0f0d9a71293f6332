"""Renewal at half of the lifetime with jitter, backoff, and the certificate manager
against an in-test CA that follows the CSR contract."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from meshpilot.agent import keys, pki, pkiclient, rotation
from meshpilot.agent.caclient import CAClient, CAError
from meshpilot.agent.rotation import CertificateManager
from meshpilot.agent.sds import ROOT_SECRET, WORKLOAD_SECRET, SecretCache

from . import _fakeca

IDENTITY = "spiffe://cluster.local/ns/default/sa/client"
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def self_signed(key: pki.PrivateKey, uris: list[str], ttl: float) -> str:
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(x509.Name([]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(seconds=ttl))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=True,
        )
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def info(lifetime: float) -> keys.CertInfo:
    return keys.CertInfo("1", T0, T0 + dt.timedelta(seconds=lifetime), (IDENTITY,))


# --- scheduling math ------------------------------------------------------------------


def test_rotation_is_at_half_the_lifetime_plus_or_minus_jitter() -> None:
    rng = random.Random(7)
    delays = [rotation.rotation_delay(info(1000), T0, rng=rng) for _ in range(2000)]
    assert min(delays) >= 450 and max(delays) <= 550
    # The jitter really spreads renewals: both halves of the window are used.
    assert min(delays) < 460 and max(delays) > 540
    assert abs(sum(delays) / len(delays) - 500) < 5


def test_rotation_counts_from_not_before_not_from_now() -> None:
    # Half of a 24 h certificate, asked 6 h after it was issued: 6 h left (+-1.2 h).
    now = T0 + dt.timedelta(hours=6)
    delay = rotation.rotation_delay(info(86400), now, rng=random.Random(1))
    assert 6 * 3600 - 0.05 * 86400 <= delay <= 6 * 3600 + 0.05 * 86400


def test_rotation_counts_from_receipt_when_the_ca_backdates() -> None:
    # A 10 s certificate backdated by 60 s: renew ~5 s after receipt, not at once.
    backdated = keys.CertInfo("1", T0 - dt.timedelta(seconds=60), T0 + dt.timedelta(seconds=10), ())
    delay = rotation.rotation_delay(backdated, T0, received=T0, rng=random.Random(2))
    assert 4.5 <= delay <= 5.5


def test_rotation_without_jitter_and_past_due() -> None:
    assert rotation.rotation_delay(info(30), T0, jitter=0) == 15
    assert rotation.rotation_delay(info(30), T0 + dt.timedelta(seconds=40)) == rotation.MIN_DELAY


def test_backoff_doubles_and_is_capped() -> None:
    delays = rotation.backoff_delays(0.5, 30, rng=random.Random(3))
    base = [0.5, 1, 2, 4, 8, 16, 30]
    assert len(delays) == len(base)
    for got, want in zip(delays, base, strict=True):
        assert 0.8 * want <= got <= 1.2 * want


# --- the manager against a CA ---------------------------------------------------------


@pytest.fixture
async def ca() -> AsyncIterator[_fakeca.FakeCA]:
    fake = _fakeca.FakeCA(tokens={"tok-1": IDENTITY})
    server, port = await _fakeca.start(fake)
    fake.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield fake
    finally:
        await server.stop(None)


def manager(ca: _fakeca.FakeCA, tmp_path: Path, **kwargs: object) -> CertificateManager:
    work = keys.ensure_private_dir(tmp_path / "work")
    root = tmp_path / "root-cert.pem"
    root.write_bytes(ca.root_pem)
    token = tmp_path / "token"
    if not token.exists():
        token.write_text("tok-1\n")
    args: dict[str, object] = {
        "client": CAClient(ca.address, b"", token),  # type: ignore[attr-defined]
        "cache": SecretCache(),
        "workdir": work,
        "identity": IDENTITY,
        "root_cert_file": root,
        "ttl": 60,
        "metadata": {"WorkloadName": "client-1"},
        "backoff_initial": 0.05,
        "backoff_max": 0.2,
    }
    args.update(kwargs)
    return CertificateManager(**args)  # type: ignore[arg-type]


async def test_first_certificate_with_token_is_stored_privately_and_served(
    ca: _fakeca.FakeCA, tmp_path: Path
) -> None:
    m = manager(ca, tmp_path)
    await m.load_root()
    issued = await m.issue()
    assert [(i.identity, i.auth, i.ttl) for i in ca.issued] == [(IDENTITY, "token", 60)]
    assert ca.metadata_seen == [{"WorkloadName": "client-1"}]
    assert issued.info.uris == (IDENTITY,)
    assert issued.info.serial == f"{ca.issued[0].serial:x}"
    work = tmp_path / "work"
    assert stat.S_IMODE(os.stat(work).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(work / "key.pem").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(work / "cert-chain.pem").st_mode) == 0o600
    assert (work / "key.pem").read_bytes() == issued.key_pem
    assert m.cache.get(WORKLOAD_SECRET) is not None
    root = m.cache.get(ROOT_SECRET)
    assert root is not None and ca.root_pem in root.resource.value
    assert m.first.is_set()


async def test_renewal_uses_the_client_certificate_and_a_new_key(
    ca: _fakeca.FakeCA, tmp_path: Path
) -> None:
    m = manager(ca, tmp_path)
    await m.load_root()
    first = await m.issue()
    # The token is gone: renewal must not need it. (The same CA on a port that insists
    # on client certificates; see FakeCA.server_credentials.)
    (tmp_path / "token").unlink()
    server, port = await _fakeca.start(ca, require_client_auth=True)
    try:
        m.client.address = f"127.0.0.1:{port}"
        second = await m.issue()
    finally:
        await server.stop(None)
    assert [i.auth for i in ca.issued] == ["token", "cert"]
    assert second.key_pem != first.key_pem
    assert second.info.serial != first.info.serial


async def test_renewal_falls_back_to_the_token_which_is_read_again(
    ca: _fakeca.FakeCA, tmp_path: Path
) -> None:
    ca.accept_client_certs = False
    m = manager(ca, tmp_path)
    await m.load_root()
    await m.issue()
    # Tokens rotate: the file now holds a new one, and only the new one is valid.
    ca.tokens = {"tok-2": IDENTITY}
    (tmp_path / "token").write_text("tok-2")
    await m.issue()
    assert [i.auth for i in ca.issued] == ["token", "token"]


async def test_ca_errors_are_retried_and_the_old_certificate_stays(
    ca: _fakeca.FakeCA, tmp_path: Path
) -> None:
    m = manager(ca, tmp_path)
    await m.load_root()
    first = await m.issue()
    # Each attempt tries the client certificate, then the token: two failed attempts.
    ca.fail_next = 4
    version = m.cache.get(WORKLOAD_SECRET).version  # type: ignore[union-attr]
    task = asyncio.create_task(m.issue_with_retries())
    await asyncio.sleep(0.01)
    assert m.cache.get(WORKLOAD_SECRET).version == version  # type: ignore[union-attr]
    assert m.current is first
    second = await asyncio.wait_for(task, 10)
    assert m.failures == 2
    assert second.info.serial != first.info.serial


async def test_bad_token_is_an_error_that_names_the_file_not_the_token(
    ca: _fakeca.FakeCA, tmp_path: Path
) -> None:
    (tmp_path / "token").write_text("not-a-valid-secret-token")
    m = manager(ca, tmp_path)
    await m.load_root()
    with pytest.raises(CAError) as e:
        await m.issue()
    assert e.value.code is not None and e.value.code.name == "UNAUTHENTICATED"
    assert "not-a-valid-secret-token" not in str(e.value)
    (tmp_path / "token").write_text("  \n")
    with pytest.raises(CAError, match="empty"):
        await m.issue()


async def test_foreign_identity_answer_is_refused(ca: _fakeca.FakeCA, tmp_path: Path) -> None:
    # The CA would sign; the agent itself checks what it got back.
    m = manager(ca, tmp_path, identity="spiffe://cluster.local/ns/default/sa/other")
    ca.tokens = {"tok-1": "spiffe://cluster.local/ns/default/sa/other"}
    await m.load_root()
    issued = await m.issue()
    assert issued.info.uris == ("spiffe://cluster.local/ns/default/sa/other",)


async def test_run_rotates_at_half_life_and_pushes_each_new_certificate(
    ca: _fakeca.FakeCA, tmp_path: Path
) -> None:
    m = manager(ca, tmp_path, ttl=2)
    versions: list[str] = []
    third = asyncio.Event()

    def on_change(names: frozenset[str]) -> None:
        if WORKLOAD_SECRET in names:
            versions.append(m.cache.get(WORKLOAD_SECRET).version)  # type: ignore[union-attr]
            if len(versions) == 3:
                third.set()

    m.cache.subscribe(on_change)
    task = asyncio.create_task(m.run())
    try:
        await asyncio.wait_for(m.first.wait(), 5)
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(third.wait(), 10)
        elapsed = asyncio.get_running_loop().time() - started
    finally:
        task.cancel()
    # Two renewals of a 2 s certificate at ~1 s each; X.509 times are whole seconds,
    # so a lifetime may be up to 1 s shorter than asked for.
    assert 0.9 <= elapsed <= 3.5
    assert len(set(versions)) == len(versions) >= 3
    assert len({i.serial for i in ca.issued}) == len(ca.issued)


async def test_unreadable_root_is_a_setup_error(ca: _fakeca.FakeCA, tmp_path: Path) -> None:
    m = manager(ca, tmp_path, root_cert_file=tmp_path / "missing.pem")
    with pytest.raises(keys.AgentSetupError, match="--root-cert"):
        await m.load_root()
    (tmp_path / "junk.pem").write_text("junk")
    m = manager(ca, tmp_path, root_cert_file=tmp_path / "junk.pem")
    with pytest.raises(keys.AgentSetupError, match="no PEM"):
        await m.load_root()


async def eventually(predicate: Callable[[], bool], timeout: float = 10) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        # State of another process and of the manager's task: nothing to await but time.
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


async def test_the_helper_of_a_renewal_is_started_before_it_is_due_and_ended_on_stop(
    ca: _fakeca.FakeCA, tmp_path: Path
) -> None:
    m = manager(ca, tmp_path, ttl=6, jitter=0)  # renewal ~3 s after issue, helper ~1 s before
    task = asyncio.create_task(m.run())
    try:
        await asyncio.wait_for(m.first.wait(), 10)
        await eventually(lambda: pkiclient._spare is not None)
        spare = pkiclient._spare
        assert spare is not None
        assert m.issued == 1  # started ahead of the renewal
        await eventually(lambda: m.issued >= 2)
        assert pkiclient._spare is not spare  # the renewal took it
        await eventually(lambda: spare.poll() is not None)  # and ended it
        await eventually(lambda: pkiclient._spare is not None)
        spare = pkiclient._spare
        assert spare is not None
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # Stopped while a helper waited for the next renewal: it is ended, not left behind.
    assert pkiclient._spare is None and spare.poll() is not None
