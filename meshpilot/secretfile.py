"""A file path for secret PEM text that APIs insist on reading from a file.

`ssl.SSLContext.load_cert_chain` only reads files. An anonymous memory file (Linux
memfd) gives it a path while the serving key never touches a disk; elsewhere a 0600
file in a private temporary directory, removed on exit. A leaf module: stdlib only.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def secret_file(text: str, name: str = "meshpilot-tls") -> Iterator[str]:
    """A path holding `text` for the duration of the `with` block."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode())
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as d:
        path = Path(d) / "cert.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        yield str(path)
