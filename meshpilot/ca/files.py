"""Small file helpers for CA material: private directories and atomic writes."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


def ensure_private_dir(path: Path) -> None:
    """Create `path` with mode 0700, or tighten an existing one to 0700.

    Tightening is deliberate: the directory is about to hold a signing key, and a
    group-readable directory next to it is the first thing an audit flags.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, 0o700)
        log.info("ca dir permissions tightened", path=str(path), old=oct(mode), new="0o700")


def write_atomic(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> bool:
    """Write `data` to `path` with exactly `mode` (umask ignored), atomically.

    A reader sees the old file or the complete new one, never a torn write. With
    `exclusive`, an existing file is left alone and False is returned (two processes
    creating the same secret at once agree on the first one written).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        # fchmod: the mode given to open() is filtered by the umask.
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def loose_mode(path: Path) -> int | None:
    """The file's mode if group or others may read it, else None."""
    mode = stat.S_IMODE(path.stat().st_mode)
    return mode if mode & 0o077 else None
