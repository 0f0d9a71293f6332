"""Keys stay private (file and directory modes), CSRs carry exactly the workload identity."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtensionOID

from meshpilot.agent import keys, pki

IDENTITY = "spiffe://cluster.local/ns/default/sa/client"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_spiffe_id_and_its_validation() -> None:
    assert keys.spiffe_id("cluster.local", "default", "client") == IDENTITY
    for bad in (("", "ns", "sa"), ("td", "a/b", "sa"), ("td", "ns", "s a")):
        with pytest.raises(keys.AgentSetupError):
            keys.spiffe_id(*bad)


@pytest.mark.parametrize(
    ("key_type", "kind"), [("ec", ec.EllipticCurvePrivateKey), ("rsa", rsa.RSAPrivateKey)]
)
def test_csr_has_exactly_one_uri_san_and_an_empty_subject(
    key_type: keys.KeyType, kind: type
) -> None:
    key = pki.generate_key(key_type)
    assert isinstance(key, kind)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        assert key.curve.name == "secp256r1"
    else:
        assert key.key_size == 2048
    csr = x509.load_pem_x509_csr(pki.build_csr(key, IDENTITY))
    assert csr.is_signature_valid
    assert list(csr.subject) == []
    assert len(csr.extensions) == 1
    san = csr.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    assert list(san.value) == [x509.UniformResourceIdentifier(IDENTITY)]


def test_unknown_key_type_is_refused() -> None:
    with pytest.raises(keys.AgentSetupError, match="key type"):
        pki.generate_key("dsa")  # type: ignore[arg-type]


def test_private_dir_is_created_0700_and_tightened(tmp_path: Path) -> None:
    fresh = keys.ensure_private_dir(tmp_path / "a" / "work")
    assert mode(fresh) == 0o700
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    keys.ensure_private_dir(loose)
    assert mode(loose) == 0o700


def test_private_dir_refuses_symlinks_and_files(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(keys.AgentSetupError, match="symlink"):
        keys.ensure_private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises(keys.AgentSetupError, match="not a directory"):
        keys.ensure_private_dir(tmp_path / "file")


def test_private_file_is_0600_from_the_start_and_replaced_atomically(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # even a careless umask must not widen the key's mode
    try:
        path = tmp_path / "key.pem"
        keys.write_private_file(path, b"one")
        assert mode(path) == 0o600
        keys.write_private_file(path, b"two")
        assert path.read_bytes() == b"two"
        assert mode(path) == 0o600
        assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]
    finally:
        os.umask(old_umask)


def test_key_pem_is_pkcs8() -> None:
    assert pki.key_pem(pki.generate_key()).startswith(b"-----BEGIN PRIVATE KEY-----")


def test_socket_path_length_is_checked(tmp_path: Path) -> None:
    assert keys.check_socket_path(Path("/tmp/x/sds.sock")) == "/tmp/x/sds.sock"
    with pytest.raises(keys.AgentSetupError, match="shorter --workdir"):
        keys.check_socket_path(Path("/tmp/" + "d" * 110) / "sds.sock")


def test_check_chain_refuses_other_keys_and_identities() -> None:
    from .test_rotation import self_signed

    key = pki.generate_key()
    good = self_signed(key, [IDENTITY], ttl=60)
    info = pki.check_chain([good], key, IDENTITY)
    assert info.uris == (IDENTITY,)
    assert 59 <= info.lifetime <= 61
    with pytest.raises(ValueError, match="another key"):
        pki.check_chain([good], pki.generate_key(), IDENTITY)
    extra = self_signed(key, [IDENTITY, "spiffe://cluster.local/ns/x/sa/y"], ttl=60)
    with pytest.raises(ValueError, match="URI SANs"):
        pki.check_chain([extra], key, IDENTITY)
    with pytest.raises(ValueError, match="empty"):
        pki.check_chain([], key, IDENTITY)
    with pytest.raises(ValueError, match="not a PEM"):
        pki.check_chain(["garbage"], key, IDENTITY)
