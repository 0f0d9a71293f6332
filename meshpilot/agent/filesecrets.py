"""Istio's file-backed SDS names, served by the agent like `default` and `ROOTCA`.

`file-cert:CERT~KEY` is a TlsCertificate from two PEM files and `file-root:CA` a
validation context from one (what Istio's agent serves for Sidecar `ingress[].tls`,
DestinationRule `tls.caCertificates` and the like). Files are read when Envoy first
asks for the name and read again when they change, which pushes the new version over
SDS; a file that cannot be read or is not PEM is logged and not served.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

if TYPE_CHECKING:
    from meshpilot.agent.sds import SecretCache

from meshpilot.agent import logfmt

log = logfmt.get_logger(__name__)

FILE_CERT_PREFIX = "file-cert:"
FILE_ROOT_PREFIX = "file-root:"
POLL_INTERVAL = 2.0
# A certificate bundle is a few KiB; never pull a huge file into Envoy's memory.
MAX_FILE_BYTES = 1024 * 1024

_Stamp = tuple[int, int, int]  # inode, size, mtime_ns


@dataclass(slots=True)
class _Watched:
    paths: tuple[str, ...]
    stamps: tuple[_Stamp, ...] | None = None


def parse_name(name: str) -> tuple[str, ...] | None:
    """The file paths behind a file-backed secret name, or None for other names."""
    if name.startswith(FILE_CERT_PREFIX):
        cert, sep, key = name[len(FILE_CERT_PREFIX) :].partition("~")
        return (cert, key) if sep and cert and key and "~" not in key else None
    if name.startswith(FILE_ROOT_PREFIX):
        path = name[len(FILE_ROOT_PREFIX) :]
        return (path,) if path else None
    return None


def _stamp(path: str) -> _Stamp:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    return data


def load(name: str, paths: tuple[str, ...]) -> tuple[secret_pb2.Secret, tuple[_Stamp, ...]]:
    """Read the files of `name` into a Secret; raises OSError or ValueError."""
    stamps = tuple(_stamp(p) for p in paths)
    secret = secret_pb2.Secret(name=name)
    if name.startswith(FILE_CERT_PREFIX):
        chain, key = _read(paths[0]), _read(paths[1])
        if b"-----BEGIN CERTIFICATE-----" not in chain:
            raise ValueError(f"{paths[0]}: no PEM certificate")
        if b"PRIVATE KEY-----" not in key:
            raise ValueError(f"{paths[1]}: no PEM private key")
        secret.tls_certificate.certificate_chain.inline_bytes = chain
        secret.tls_certificate.private_key.inline_bytes = key
    else:
        roots = _read(paths[0])
        if b"-----BEGIN CERTIFICATE-----" not in roots:
            raise ValueError(f"{paths[0]}: no PEM certificate")
        secret.validation_context.trusted_ca.inline_bytes = roots
    return secret, stamps


class FileSecrets:
    """Loads file-backed names into a SecretCache and keeps them current."""

    def __init__(self, cache: SecretCache, poll_interval: float = POLL_INTERVAL) -> None:
        self.cache = cache
        self.poll_interval = poll_interval
        self._watched: dict[str, _Watched] = {}
        self._task: asyncio.Task[None] | None = None

    async def ensure(self, names: Iterable[str]) -> None:
        """Load the file-backed `names` not known yet (other names are ignored)."""
        for name in names:
            if name in self._watched:
                continue
            paths = parse_name(name)
            if paths is None:
                continue
            self._watched[name] = _Watched(paths)
            await self._refresh(name)
            if self._task is None:
                self._task = asyncio.create_task(self._poll(), name="sds-file-secrets")

    async def _refresh(self, name: str) -> None:
        watched = self._watched[name]
        try:
            stamps = await asyncio.to_thread(lambda: tuple(_stamp(p) for p in watched.paths))
            if stamps == watched.stamps:
                return
            secret, stamps = await asyncio.to_thread(load, name, watched.paths)
        except (OSError, ValueError) as e:
            if watched.stamps != ():
                # Logged once per failure streak; the path is config, not a secret.
                log.warning("sds file secret unavailable", name=name, error=str(e))
            watched.stamps = ()
            return
        watched.stamps = stamps
        if self.cache.set_if_changed(secret) is not None:
            log.info("sds file secret loaded", name=name)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            for name in list(self._watched):
                await self._refresh(name)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
