"""`make run`: the control plane, four small apps and their Envoy sidecars, on loopback.

Starts `meshpilot serve` on examples/demo-mesh, one app and one real Envoy per
WorkloadEntry there, waits until every Envoy has ACKed its config, sends requests
through the mesh and prints what answered. Ctrl-C stops every process it started.

Child logs go to a directory that outlives the demo (`--log-dir`, printed at start
and with any failure); the bootstraps go to a temporary directory that is removed
on every exit, whether normal, by Ctrl-C/SIGTERM or by failure.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "examples" / "demo-mesh"
LOG_DIR = ROOT / "demo-logs"


@dataclass(frozen=True)
class Workload:
    name: str
    app: str
    version: str
    ip: str  # WorkloadEntry address: sidecar inbound on :9080, app on :8080
    egress: str  # the app's way out: Sidecar egress bind address, port 9080
    service_account: str


WORKLOADS = (
    Workload(
        "productpage-v1", "productpage", "v1", "127.0.1.1", "127.0.2.1", "bookinfo-productpage"
    ),
    Workload("reviews-v1", "reviews", "v1", "127.0.1.2", "127.0.2.2", "bookinfo-reviews"),
    Workload("reviews-v2", "reviews", "v2", "127.0.1.3", "127.0.2.3", "bookinfo-reviews"),
    Workload("ratings-v1", "ratings", "v1", "127.0.1.4", "127.0.2.4", "bookinfo-ratings"),
)
SERVICE_PORT = 9080
APP_PORT = 8080


class Processes:
    """Every child process, stopped by pid in reverse start order."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.children: list[tuple[str, asyncio.subprocess.Process]] = []

    async def start(self, name: str, *argv: str, wait_line: str | None = None) -> None:
        log = await asyncio.to_thread(open, self.logdir / f"{name}.log", "wb")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE if wait_line else log,
            stderr=log,
            start_new_session=True,
        )
        self.children.append((name, proc))
        if wait_line and proc.stdout is not None:
            try:
                async with asyncio.timeout(15):
                    line = await proc.stdout.readline()
            except TimeoutError:
                line = b""
            if line.decode().strip() != wait_line:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2):
                        await proc.wait()
                raise RuntimeError(f"{name} did not start: {self.error_of(name)}")

    def log_path(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def error_of(self, name: str) -> str:
        """What a failed child said, with a hint when it is a port clash, and its log."""
        path = self.log_path(name)
        try:
            lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
        except OSError:
            lines = []
        lines = [ln for ln in lines if ln]
        # meshpilot's CLI ends with one "meshpilot <command>: reason" line; Envoy and
        # Python tracebacks put the reason last.
        said = next((ln for ln in reversed(lines) if ln.startswith("meshpilot ")), "")
        said = said or (lines[-1] if lines else "(no output)")
        out = f"{said}\n  log: {path}"
        if busy := _busy_port(said):
            out += (
                f"\n  port {busy} is in use (another `make run`?); pick other ports,"
                " e.g. make run ARGS='--xds-port 16010 --monitoring-port 16014'"
            )
        return out

    async def stop(self) -> None:
        for _, proc in reversed(self.children):
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for name, proc in reversed(self.children):
            try:
                async with asyncio.timeout(5):
                    await proc.wait()
            except TimeoutError:
                print(f"  {name} (pid {proc.pid}) did not stop; killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    def dead(self) -> list[str]:
        """Long-running children that exited (one-shot commands exit 0 by design)."""
        return [
            n
            for n, p in self.children
            if p.returncode not in (None, 0)
            or (p.returncode == 0 and not n.startswith("bootstrap-"))
        ]


async def _get(session: aiohttp.ClientSession, url: str, **kw: object) -> tuple[int, str]:
    async with session.get(url, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.text()


async def _wait(
    what: str, check: Callable[[], Awaitable[bool]], limit: float, procs: Processes
) -> None:
    deadline = time.monotonic() + limit
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
            if await check():
                return
        if dead := procs.dead():
            said = "\n".join(f"{n}: {procs.error_of(n)}" for n in dead)
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{said}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {limit:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


def _busy_port(message: str) -> str:
    """The host:port an "address already in use" message is about, or ""."""
    if "in use" not in message.lower() and "failed to bind" not in message.lower():
        return ""
    # aiohttp: "... bind on address ('127.0.0.1', 15014): address already in use";
    # gRPC: "... cannot listen on 127.0.0.1:15010: Failed to bind ...".
    if m := re.search(r"\('([^']+)',\s*(\d+)\)", message):
        return f"{m.group(1)}:{m.group(2)}"
    if m := re.search(r"(\d+\.\d+\.\d+\.\d+|\[[0-9a-fA-F:]+\]|localhost):(\d+)", message):
        return f"{m.group(1)}:{m.group(2)}"
    return ""


def _synced(entry: dict[str, Any]) -> bool:
    return all(
        entry.get(f"{t}_sent") and entry.get(f"{t}_sent") == entry.get(f"{t}_acked")
        for t in ("cluster", "listener", "route", "endpoint")
    )


async def run(args: argparse.Namespace) -> int:
    python = sys.executable
    envoy = str(Path(python).with_name("envoy"))
    logdir = Path(args.log_dir)
    workdir = Path(tempfile.mkdtemp(prefix="meshpilot-demo-"))
    procs = Processes(logdir)
    xds = f"127.0.0.1:{args.xds_port}"
    monitoring = f"http://127.0.0.1:{args.monitoring_port}"
    # SIGINT and SIGTERM cancel the demo wherever it is, so that `finally` always stops
    # the children and removes the temporary directory. After setup they just stop it.
    task = asyncio.current_task()
    assert task is not None
    stop = asyncio.Event()
    waiting = False

    def on_signal() -> None:
        if waiting:
            stop.set()
        else:
            task.cancel()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        print(f"logs: {logdir}")
        print(f"control plane: meshpilot serve --config-dir {CONFIG_DIR.relative_to(ROOT)}")
        await procs.start(
            "meshpilot",
            python, "-m", "meshpilot", "serve", "--config-dir", str(CONFIG_DIR),
            "--xds-address", xds,
            "--monitoring-address", f"127.0.0.1:{args.monitoring_port}",
        )  # fmt: skip
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def ready() -> bool:
                return (await _get(http, f"{monitoring}/ready"))[0] == 200

            await _wait("meshpilot /ready", ready, 20, procs)
            for i, w in enumerate(WORKLOADS):
                await procs.start(
                    f"app-{w.name}",
                    python, "-m", "meshpilot.demo.apps", "http",
                    "--listen", f"{w.ip}:{APP_PORT}", "--service", w.app,
                    "--version", w.version, "--upstream", f"http://{w.egress}:{SERVICE_PORT}",
                    wait_line="ready",
                )  # fmt: skip
                boot = workdir / f"{w.name}.bootstrap.json"
                await procs.start(
                    f"bootstrap-{w.name}",
                    python, "-m", "meshpilot", "bootstrap", "--name", w.name,
                    "--namespace", "default", "--ip", w.ip,
                    "--label", f"app={w.app}", "--label", f"version={w.version}",
                    "--service-account", w.service_account, "--xds-address", xds,
                    "--admin-port", str(args.admin_base_port + i), "-o", str(boot),
                )  # fmt: skip
                await procs.children[-1][1].wait()
                if procs.children[-1][1].returncode != 0:
                    raise RuntimeError(
                        f"meshpilot bootstrap failed: {procs.error_of(f'bootstrap-{w.name}')}"
                    )
                await procs.start(
                    f"envoy-{w.name}",
                    envoy, "-c", str(boot), "--disable-hot-restart",
                    "--base-id", str(os.getpid() % 10000 * 10 + i),
                    "--log-level", "warning", "--concurrency", "1",
                )  # fmt: skip
            print(f"sidecars: {len(WORKLOADS)} Envoys, admin on 127.0.0.1:{args.admin_base_port}+")

            async def all_synced() -> bool:
                status, text = await _get(http, f"{monitoring}/debug/syncz")
                entries = json.loads(text) if status == 200 else []
                return len(entries) >= len(WORKLOADS) and all(_synced(e) for e in entries)

            t0 = time.monotonic()
            await _wait("every Envoy to ACK its config", all_synced, 30, procs)
            print(f"all {len(WORKLOADS)} sidecars synced in {time.monotonic() - t0:.2f}s\n")

            url = f"http://127.0.1.1:{SERVICE_PORT}/call/reviews:{SERVICE_PORT}/call/ratings:{SERVICE_PORT}/"
            print("request:  productpage -> reviews -> ratings, every hop through Envoy:")
            print(f"  curl -s {url}")
            seen: collections.Counter[str] = collections.Counter()
            answer: dict[str, Any] = {}

            async def chain_works() -> bool:
                nonlocal answer
                status, text = await _get(http, url)
                answer = json.loads(text)
                return status == 200

            await _wait("the first request through the mesh", chain_works, 10, procs)
            for _ in range(10):
                status, text = await _get(http, url)
                body = json.loads(text)
                reviews = body.get("upstream", {}).get("body", {})
                seen[f"{reviews.get('service')} {reviews.get('version')} -> {status}"] += 1
            reviews = answer["upstream"]["body"]
            ratings = reviews["upstream"]["body"]
            print(
                f"answer:   productpage {answer['version']} (served by {answer['served_by']})"
                f" -> reviews {reviews['version']} (served by {reviews['served_by']})"
                f" -> ratings {ratings['version']} (served by {ratings['served_by']})"
            )
            print("10 more requests, reviews answered by:")
            for k, n in sorted(seen.items()):
                print(f"  {n:3d} x {k}")
            dump = f"{monitoring}/debug/config_dump?proxyID=productpage-v1.default"
            print(f"\nconfig of one sidecar: curl -s '{dump}'")
            print(f"sync state:            curl -s {monitoring}/debug/syncz")
            print(
                f"edit {CONFIG_DIR.relative_to(ROOT)}/*.yaml: the sidecars follow within a second."
            )
        if args.check:
            return 0
        print("\nPress Ctrl-C to stop.")
        waiting = True
        while not stop.is_set():
            if dead := procs.dead():
                print(f"{', '.join(dead)} exited; stopping", file=sys.stderr)
                for name in dead:
                    print(f"{name}: {procs.error_of(name)}", file=sys.stderr)
                return 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    await stop.wait()
        return 0
    except asyncio.CancelledError:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        print(f"demo failed: {e}\nlogs: {logdir}", file=sys.stderr)
        return 1
    finally:
        print("stopping...")
        # A second Ctrl-C while stopping must not leave Envoys or the directory behind:
        # stopping takes at most a few seconds (SIGTERM, then SIGKILL after 5 s).
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: None)
        await procs.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meshpilot.demo",
        description=(
            "The control plane on examples/demo-mesh, four demo apps and their Envoy "
            "sidecars on 127.0.1.1-4 (apps :8080, sidecars :9080, egress 127.0.2.x:9080). "
            "`make run ARGS='...'` passes these flags."
        ),
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 0 after the demo requests instead of waiting"
    )
    parser.add_argument(
        "--xds-port", type=int, default=15010, help="control plane xDS port on 127.0.0.1"
    )
    parser.add_argument(
        "--monitoring-port",
        type=int,
        default=15014,
        help="control plane /ready, /metrics and /debug/* port on 127.0.0.1",
    )
    parser.add_argument(
        "--admin-base-port",
        type=int,
        default=15100,
        help="Envoy admin port of the first sidecar; the others take the next ports",
    )
    parser.add_argument(
        "--log-dir",
        default=str(LOG_DIR),
        help="where each process's log goes; kept after exit, cleared at start",
    )
    args = parser.parse_args(argv)
    logdir = Path(args.log_dir)
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        for old in logdir.glob("*.log"):
            old.unlink()
    except OSError as e:
        print(f"--log-dir {logdir}: {e.strerror}", file=sys.stderr)
        return 1
    envoy = Path(sys.executable).with_name("envoy")
    if not envoy.exists():
        print(f"envoy not found at {envoy}: run `make install`", file=sys.stderr)
        return 1
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
