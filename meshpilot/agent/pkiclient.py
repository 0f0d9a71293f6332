"""The agent's side of the key helper (`python -m meshpilot.agent.pki`).

One helper process per certificate: it generates the key and CSR, waits while the
agent asks the CA, checks the chain the CA returned against the key and the identity,
and exits. The agent thus never loads a cryptography library; its resident memory
stays that of gRPC, protobuf and asyncio (see meshpilot/agent/pki.py for the why).

The helper for the first certificate is started by the agent's entry point before its
own imports (`adopt_spare`), so both interpreters load their libraries at the same
time and the first certificate is not delayed by the helper's start-up; the helper for
a renewal is started a moment before it is due (`prestart`), for the same reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from typing import Any

from meshpilot.agent import PKI_HELPER_MODULE, keys

# A key, a CSR, or the facts of a certificate: a few KB. A longer line is a broken
# helper, not something to buffer.
MAX_REPLY = 64 * 1024
# RSA 2048 generation is the slow step: ~0.1-1 s, more on a loaded machine.
REPLY_TIMEOUT = 30.0
EXIT_TIMEOUT = 5.0

# A helper started ahead of time, taken by the first exchange (see the module doc).
_spare: subprocess.Popen[bytes] | None = None


class PkiHelperError(OSError):
    """The key helper failed (did not start, died, or answered nonsense); retried like a
    CA that cannot be reached."""


def spawn(argv: list[str] | tuple[str, ...]) -> subprocess.Popen[bytes]:
    """Start a helper; its stderr (tracebacks) is the agent's."""
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def adopt_spare(proc: subprocess.Popen[bytes]) -> None:
    """Use `proc`, a helper started with `spawn`, for the next exchange."""
    global _spare
    discard_spare()
    _spare = proc


async def prestart() -> None:
    """Start the helper for the next exchange now, unless one is waiting already."""
    if _spare is None or _spare.poll() is not None:
        proc = await asyncio.to_thread(spawn, PkiHelper.argv)
        adopt_spare(proc)


def discard_spare() -> None:
    """Stop the spare helper if no exchange took it (the agent stops before its first
    certificate); by its pid, as every child of the agent."""
    global _spare
    proc, _spare = _spare, None
    if proc is not None:
        _end(proc, kill=True)


def _end(proc: subprocess.Popen[bytes], kill: bool = False, timeout: float = EXIT_TIMEOUT) -> None:
    """Close its input (it exits at end of input); kill it if asked or if it hangs."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    if kill and proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


class PkiHelper:
    """One exchange with a key helper process: `async with PkiHelper(...) as h`."""

    # The same interpreter (and so the same installed packages) as the agent.
    argv: tuple[str, ...] = (sys.executable, "-m", PKI_HELPER_MODULE)

    def __init__(self, key_type: keys.KeyType, identity: str) -> None:
        self.key_type = key_type
        self.identity = identity
        self.process: subprocess.Popen[bytes] | None = None
        self._hung = False

    async def __aenter__(self) -> PkiHelper:
        global _spare
        proc, _spare = _spare, None
        if proc is not None and proc.poll() is not None:
            _end(proc)  # it died meanwhile: start another
            proc = None
        if proc is None:
            try:
                # fork/exec off the event loop: a few ms, more with many threads.
                proc = await asyncio.to_thread(spawn, self.argv)
            except OSError as e:
                raise PkiHelperError(f"key helper: cannot start {self.argv[0]}: {e}") from e
        self.process = proc
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """End the helper: its input closed, it exits; killed (by its pid) if it hangs."""
        proc, self.process = self.process, None
        if proc is not None:
            await asyncio.to_thread(_end, proc, self._hung)

    async def new_key(self) -> tuple[bytes, bytes]:
        """A fresh private key (PKCS#8 PEM) and the PEM CSR for the identity."""
        reply = await self._ask({"key_type": self.key_type, "identity": self.identity})
        key_pem, csr_pem = reply.get("key_pem"), reply.get("csr_pem")
        if not isinstance(key_pem, str) or not isinstance(csr_pem, str):
            raise PkiHelperError(f"key helper: {self._error(reply, 'no key and CSR')}")
        return key_pem.encode(), csr_pem.encode()

    async def check_chain(self, chain: list[str]) -> keys.CertInfo:
        """The leaf's facts if the chain is for our key and only our identity; else
        ValueError saying what the CA got wrong."""
        reply = await self._ask({"chain": chain})
        if "info" not in reply:
            raise ValueError(self._error(reply, "no answer about the chain"))
        try:
            return keys.CertInfo.from_json(reply["info"])
        except ValueError as e:
            raise PkiHelperError(f"key helper: {e}") from e

    async def _ask(self, request: dict[str, Any]) -> dict[str, Any]:
        proc = self.process
        if proc is None:
            raise PkiHelperError("key helper: not started")
        try:
            line = await asyncio.wait_for(
                asyncio.to_thread(_exchange, proc, json.dumps(request).encode() + b"\n"),
                REPLY_TIMEOUT,
            )
        except TimeoutError as e:
            self._hung = True
            # close() kills it, which also ends the thread blocked reading its output.
            raise PkiHelperError(f"key helper: no answer within {REPLY_TIMEOUT:g}s") from e
        except OSError as e:  # broken pipe: it died
            raise PkiHelperError(f"key helper: {e}") from e
        if not line:
            code = await asyncio.to_thread(proc.wait)
            raise PkiHelperError(f"key helper exited with status {code} without answering")
        if len(line) > MAX_REPLY:
            raise PkiHelperError(f"key helper: reply longer than the limit ({MAX_REPLY} bytes)")
        try:
            reply = json.loads(line)
        except ValueError as e:
            raise PkiHelperError(f"key helper: reply is not JSON: {e}") from e
        if not isinstance(reply, dict):
            raise PkiHelperError("key helper: reply is not a JSON object")
        return reply

    @staticmethod
    def _error(reply: dict[str, Any], default: str) -> str:
        error = reply.get("error")
        return error if isinstance(error, str) else default


def _exchange(proc: subprocess.Popen[bytes], request: bytes) -> bytes:
    """Write one request line, read one reply line (at most MAX_REPLY + 1 bytes)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(request)
    proc.stdin.flush()
    return proc.stdout.readline(MAX_REPLY + 1)
