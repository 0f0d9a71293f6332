"""Child processes with a JSON-lines control channel, and /proc readings.

Every benchmark process (control plane, raw floor, proxy simulators) is a child that
reads one JSON command per line on stdin and writes one JSON event per line on the
stdout it was started with. A child exits when its stdin closes, so nothing outlives
the runner even if the runner is killed; the runner also stops each child by pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# --- /proc -----------------------------------------------------------------------------


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def rss_kb(pid: int) -> int:
    """VmRSS of a process in KiB."""
    return _status_kb(pid, "VmRSS:")


def peak_rss_kb(pid: int) -> int:
    """VmHWM (the highest RSS since the process started) in KiB."""
    return _status_kb(pid, "VmHWM:")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    # After the ")" field 3 (state) is index 0: utime is field 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (threads with equal names summed)."""
    out: dict[str, float] = {}
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    text = f.read()
            except FileNotFoundError:
                continue
            name = text[text.index("(") + 1 : text.rindex(")")]
            fields = text.rpartition(")")[2].split()
            secs = (int(fields[11]) + int(fields[12])) / CLK_TCK
            out[name] = out.get(name, 0.0) + secs
    return out


class CpuSampler:
    """Samples a process's CPU time every `interval`, to read it back at any instant.

    Lets the runner charge a push with the CPU used between two instants that are only
    known afterwards (e.g. the last ACK seen by a proxy in another process).
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> tuple[float, float]:
        s = (time.monotonic(), cpu_seconds(self.pid))
        self.samples.append(s)
        return s

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"cpu-{self.pid}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def at(self, t: float) -> float:
        """CPU seconds at monotonic time `t`, interpolated between samples."""
        s = self.samples
        if not s:
            return cpu_seconds(self.pid)
        if t <= s[0][0]:
            return s[0][1]
        lo, hi = 0, len(s) - 1
        if t >= s[hi][0]:
            return s[hi][1]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if s[mid][0] <= t:
                lo = mid
            else:
                hi = mid
        (t0, c0), (t1, c1) = s[lo], s[hi]
        return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1

    def between(self, t0: float, t1: float) -> float:
        return self.at(t1) - self.at(t0)

    def rate(self, t0: float, t1: float) -> float:
        """Average CPU use (cores) over a quiet interval: the idle cost to subtract."""
        return self.between(t0, t1) / (t1 - t0) if t1 > t0 else 0.0


# --- the child side --------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent dies (Linux)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def control_channel() -> TextIO:
    """The stdout the runner reads, kept for events; fd 1 is pointed at stderr so that
    nothing else (logs, libraries) can write to the control channel."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


class Control:
    """The child's end: emit events, receive commands."""

    def __init__(self) -> None:
        die_with_parent()
        self.out = control_channel()

    def emit(self, event: str, **data: Any) -> None:
        self.out.write(json.dumps({"event": event, **data}) + "\n")
        self.out.flush()

    async def commands(self) -> asyncio.StreamReader:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        return reader

    async def serve(self, handle: Callable[[dict[str, Any]], Any]) -> None:
        """Call `handle(command)` for every line until stdin closes or it returns "quit"."""
        reader = await self.commands()
        while line := await reader.readline():
            cmd = json.loads(line)
            try:
                result = handle(cmd)
                if asyncio.iscoroutine(result):
                    result = await result
            except Exception as e:
                self.emit("error", cmd=cmd.get("cmd"), error=repr(e))
                continue
            if result == "quit":
                return


# --- the runner side -------------------------------------------------------------------


class Child:
    """A child process started by the runner; events are read in the background."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.pid = proc.pid
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read(), name=f"events-{name}")
        self._backlog: list[dict[str, Any]] = []
        self.exited = False

    @staticmethod
    async def start(name: str, args: list[str], env: dict[str, str] | None = None) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,
            env={**os.environ, **(env or {})},
            limit=64 * 1024 * 1024,
        )
        return Child(name, proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                sys.stderr.write(f"[{self.name}] {line.decode(errors='replace')}")
                continue
            await self._events.put(event)
        self.exited = True
        await self._events.put({"event": "exit"})

    def send(self, cmd: str, **data: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **data}) + "\n").encode())

    async def expect(self, event: str, within: float) -> dict[str, Any]:
        """The oldest event named `event` (others stay queued for later); errors raise."""
        for i, e in enumerate(self._backlog):
            if e["event"] == event:
                return self._backlog.pop(i)
        async with asyncio.timeout(within):
            while True:
                e = await self._events.get()
                if e["event"] == event:
                    return e
                if e["event"] in ("error", "exit"):
                    raise RuntimeError(f"{self.name} (pid {self.pid}): {e}")
                self._backlog.append(e)

    async def request(self, cmd: str, reply: str, within: float, **data: Any) -> dict[str, Any]:
        self.send(cmd, **data)
        return await self.expect(reply, within)

    async def stop(self, within: float = 5.0) -> None:
        """Close stdin (the child exits by itself), then SIGTERM, then SIGKILL, by pid."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), within)
            except TimeoutError:
                for sig in (signal.SIGTERM, signal.SIGKILL):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, sig)
                    try:
                        await asyncio.wait_for(self.proc.wait(), within)
                        break
                    except TimeoutError:
                        continue
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    def kill_now(self) -> None:
        """Last resort from a synchronous context (atexit, signal handler)."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
