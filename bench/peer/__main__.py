"""Side by side with sovereign: both servers, the same work, one run, ratios.

    python -m bench.peer                 # 1000 services x 3 endpoints, 3 runs
    python -m bench.peer --runs 1 --services 200 --batch 4 --peer-batch 1   # smoke

Per run both servers are started fresh and measured phase by phase, alternating
(meshpilot, then sovereign, for each phase) so both see the same machine load:
start to ready, first full config, full config (CDS+EDS+LDS+RDS for one proxy) with
proxies sharing a scope, each in its own namespace, each a workload's sidecar, one
endpoint change delivered to one proxy, then the memory of all server processes.
Server CPU is read from /proc around a batch of requests, minus the idle CPU measured
beforehand over a quiet interval, divided by the batch size. Ratios are sovereign /
meshpilot within each run; medians and min..max over the runs are printed and written
to bench/results/peer-SxE.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench.peer import accounting, meshpilot_side, sovereign_setup, workload
from bench.peer.accounting import Reading

ROOT = Path(__file__).resolve().parents[2]
PEER_VENV = ROOT / "bench" / ".peer-venv"
RESULTS = ROOT / "bench" / "results"
HOST = "127.0.0.1"

FIGURES = (
    ("start_s", "start to ready", "s"),
    ("first_cpu_s", "first full config, server CPU", "s"),
    ("first_wall_s", "first full config, wall", "s"),
    ("start_to_config_s", "start to first full config, wall", "s"),
    ("shared_cpu_s", "full config, shared scope", "s CPU"),
    ("namespace_cpu_s", "full config, own namespace", "s CPU"),
    ("sidecar_cpu_s", "full config, workload sidecar", "s CPU"),
    ("change_cpu_s", "endpoint change to one proxy", "s CPU"),
    ("eds_poll_unchanged_cpu_s", "REST EDS poll, nothing new", "s CPU"),
    ("rss_first_mb", "RSS after the first config", "MB"),
    ("rss_mb", "RSS, all server processes", "MB"),
    ("pss_mb", "PSS, all server processes", "MB"),
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Server:
    """A server process group started by the runner, stopped by pid."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.t_spawn = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=None,  # the servers' own warnings go to the terminal
            start_new_session=True,
        )
        self.pids = [self.proc.pid]
        self.idle = 0.0

    def reading(self) -> Reading:
        return Reading(time.monotonic(), accounting.cpu_of(self.pids))

    def adopt_children(self) -> None:
        """Pin the process group (gunicorn workers are forked after the master starts)."""
        self.pids = accounting.process_tree(self.proc.pid)

    async def wait_ready(self, url: str, session: aiohttp.ClientSession, within: float) -> float:
        deadline = self.t_spawn + within
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before ready")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=1)) as r:
                    if r.status == 200:
                        return time.monotonic() - self.t_spawn
            await asyncio.sleep(0.02)
        raise TimeoutError(f"{self.name} not ready within {within}s ({url})")

    def stop(self, within: float = 10.0) -> None:
        """SIGTERM the main pid, then SIGKILL every pid of the group still alive."""
        pids = accounting.process_tree(self.proc.pid) if self.proc.poll() is None else []
        known = set(self.pids) | set(pids)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(within)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(within)
        for pid in known - {self.proc.pid}:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                # Only our own group's pids: a recycled pid would not be in our session.
                if os.getsid(pid) == self.proc.pid:
                    os.kill(pid, signal.SIGKILL)


async def measure_idle(servers: list[Server], seconds: float) -> None:
    before = [s.reading() for s in servers]
    await asyncio.sleep(seconds)
    for s, b in zip(servers, before, strict=True):
        s.idle = accounting.idle_rate(b, s.reading())


async def batch(server: Server, n: int, one: Callable[[int], Awaitable[None]]) -> float:
    before = server.reading()
    for k in range(n):
        await one(k)
    return accounting.per_request(before, server.reading(), n, server.idle)


class Run:
    def __init__(self, args: argparse.Namespace, index: int, tmp: Path, sov_exe: Path) -> None:
        self.args = args
        self.index = index
        self.tmp = tmp
        self.sov_exe = sov_exe
        self.mp_mesh = workload.Mesh(args.services, args.endpoints)
        self.sov_mesh = workload.Mesh(args.services, args.endpoints)
        self.mp: dict[str, Any] = {}
        self.sov: dict[str, Any] = {}
        self.sizes: dict[str, Any] = {}

    async def go(self, session: aiohttp.ClientSession) -> None:
        a = self.args
        mp_dir = self.tmp / f"meshpilot-{self.index}"
        sov_dir = self.tmp / f"sovereign-{self.index}"
        meshpilot_side.write_config(mp_dir, self.mp_mesh)
        sov_cfg = sovereign_setup.write_config(sov_dir, self.sov_mesh, a.refresh)
        xds, mon, sport = free_port(), free_port(), free_port()
        target = f"{HOST}:{xds}"
        base = f"http://{HOST}:{sport}"
        self.load = {"start": loadavg()}
        servers: list[Server] = []
        try:
            mp = Server(
                "meshpilot",
                [sys.executable, *meshpilot_side.serve_args(mp_dir, xds, mon)],
                dict(os.environ),
                ROOT,
            )
            servers.append(mp)
            self.mp["start_s"] = await mp.wait_ready(f"http://{HOST}:{mon}/ready", session, 120)
            sov = Server(
                "sovereign",
                [str(self.sov_exe)],
                sovereign_setup.server_env(sov_cfg, sport, a.workers),
                sov_dir,
            )
            servers.append(sov)
            self.sov["start_s"] = await sov.wait_ready(f"{base}/healthcheck", session, 120)
            await asyncio.sleep(0.5)  # let gunicorn fork every worker
            sov.adopt_children()
            self.sov["processes"] = len(sov.pids)

            # First full config after start (before any idle reading: it is the first).
            async def mp_first() -> None:
                p = await meshpilot_side.full_config(target, self._mp_node("shared", 0), 60)
                self.sizes["meshpilot"] = {"bytes": p.sizes, "resources": p.counts}

            async def sov_first() -> None:
                p = sovereign_setup.RestProxy(session, base, self._sov_node("shared", 0))
                await p.full()
                self.sizes["sovereign"] = {"bytes": p.bytes, "resources": p.counts}

            for out, srv, fn in ((self.mp, mp, mp_first), (self.sov, sov, sov_first)):
                before = srv.reading()
                await fn()
                after = srv.reading()
                out["first_cpu_s"] = after.cpu - before.cpu
                out["first_wall_s"] = after.t - before.t
            for out, srv in ((self.mp, mp), (self.sov, sov)):
                out["start_to_config_s"] = out["start_s"] + out["first_wall_s"]
                mem = accounting.memory_of(accounting.process_tree(srv.proc.pid))
                out["rss_first_mb"] = mem["rss_kb"] / 1024
            if self.index == 0:
                # Outside any measured window: sovereign renders two more full configs.
                await self._sov_validate(session, base)

            await measure_idle(servers, a.idle)
            self.mp["idle_cores"], self.sov["idle_cores"] = mp.idle, sov.idle

            for scenario in ("shared", "namespace", "sidecar"):
                self.mp[f"{scenario}_cpu_s"] = await batch(
                    mp, a.batch, functools.partial(self._mp_full, target, scenario)
                )
                self.sov[f"{scenario}_cpu_s"] = await batch(
                    sov, a.peer_batch, functools.partial(self._sov_full, session, base, scenario)
                )

            self.mp["change_cpu_s"] = await self._mp_changes(mp, mp_dir, target)
            await self._sov_changes(sov, sov_dir, session, base)

            for out, srv in ((self.mp, mp), (self.sov, sov)):
                mem = accounting.memory_of(accounting.process_tree(srv.proc.pid))
                out["rss_mb"] = mem["rss_kb"] / 1024
                out["pss_mb"] = mem["pss_kb"] / 1024
                # Distinct proxies (node ids) served by then: caches grow with scopes.
                # (the first, three batches, the endpoint-change proxy).
                out["proxies_served"] = 1 + 3 * (a.batch if srv is mp else a.peer_batch) + 1
        finally:
            for s in servers:
                s.stop()
            self.load["end"] = loadavg()
            shutil.rmtree(mp_dir, ignore_errors=True)
            shutil.rmtree(sov_dir, ignore_errors=True)

    # --- proxies -----------------------------------------------------------------------

    def _where(self, mesh: workload.Mesh, scenario: str, k: int) -> tuple[str, str, str]:
        """(ip, pod name, namespace) of proxy k in a scenario."""
        if scenario == "shared":
            return workload.proxy_ip(k), f"proxy-{k}", workload.NAMESPACE
        if scenario == "namespace":
            return workload.proxy_ip(k), f"proxy-{k}", f"tenant-{k}"
        if scenario == "sidecar":
            # Skip service 0: its endpoints move in the endpoint-change phase.
            return mesh.workload_ip(k + 1), f"svc-{k + 1}-pod", workload.NAMESPACE
        raise ValueError(f"unknown scenario {scenario!r}")

    def _mp_node(self, scenario: str, k: int) -> bytes:
        return meshpilot_side.node_bytes(*self._where(self.mp_mesh, scenario, k))

    def _sov_node(self, scenario: str, k: int) -> dict[str, Any]:
        return sovereign_setup.node(*self._where(self.sov_mesh, scenario, k))

    async def _sov_validate(self, session: aiohttp.ClientSession, base: str) -> None:
        for scenario in ("shared", "sidecar"):
            p = sovereign_setup.RestProxy(session, base, self._sov_node(scenario, 20_000))
            p.check = True
            await p.full()

    async def _mp_full(self, target: str, scenario: str, k: int) -> None:
        # k + 1: proxy 0 of the shared scope already fetched the first config.
        p = await meshpilot_side.full_config(target, self._mp_node(scenario, k + 1), 60)
        if scenario == "sidecar":
            self.sizes.setdefault("meshpilot_sidecar", {"resources": p.counts})

    async def _sov_full(
        self, session: aiohttp.ClientSession, base: str, scenario: str, k: int
    ) -> None:
        p = sovereign_setup.RestProxy(session, base, self._sov_node(scenario, k + 1))
        await p.full()
        if scenario == "sidecar":
            self.sizes.setdefault("sovereign_sidecar", {"resources": p.counts})

    # --- endpoint changes --------------------------------------------------------------

    async def _mp_changes(self, mp: Server, config_dir: Path, target: str) -> float:
        a = self.args
        proxy = meshpilot_side.AdsProxy(target, self._mp_node("shared", 10_000))
        await proxy.start()
        try:
            await proxy.synced(60)
            await asyncio.sleep(0.5)
            total = 0.0
            changes: int = a.changes
            for _ in range(changes):
                proxy.drain()
                old = proxy.eds_version
                svc, _ = self.mp_mesh.move(0)
                before = mp.reading()
                meshpilot_side.write_service(config_dir, svc)
                arrived = await meshpilot_side.wait_version_change(proxy, old, 30)
                # Charge until the push arrived plus a short tail for the ACK's handling.
                await asyncio.sleep(max(0.0, arrived + 0.05 - time.monotonic()))
                total += accounting.per_request(before, mp.reading(), 1, mp.idle)
            return total / changes
        finally:
            await proxy.close()

    async def _sov_changes(
        self, sov: Server, sov_dir: Path, session: aiohttp.ClientSession, base: str
    ) -> None:
        """sovereign renders per request: a change reaches a proxy on its next EDS poll,
        which costs one EDS render. Polls that found nothing new are the REST
        subscription's steady cost (Envoy polls every refresh_delay)."""
        a = self.args
        proxy = sovereign_setup.RestProxy(session, base, self._sov_node("shared", 10_000))
        await proxy.full()
        changed: list[float] = []
        unchanged: list[float] = []
        deadline = time.monotonic() + a.changes * (a.refresh + 2) * 4 + 30
        for _ in range(a.changes):
            self.sov_mesh.move(0)
            sovereign_setup.write_instances(sov_dir, self.sov_mesh)
            while time.monotonic() < deadline:
                # Every worker re-reads the source every `refresh` seconds.
                await asyncio.sleep(a.refresh + 0.3)
                before = sov.reading()
                got = await proxy.endpoints()
                cost = accounting.per_request(before, sov.reading(), 1, sov.idle)
                (changed if got else unchanged).append(cost)
                if got:
                    break
            else:
                raise TimeoutError("sovereign: the endpoint change never reached the proxy")
        if not unchanged:
            before = sov.reading()
            got = await proxy.endpoints()
            unchanged.append(accounting.per_request(before, sov.reading(), 1, sov.idle))
        self.sov["change_cpu_s"] = sum(changed) / len(changed)
        self.sov["eds_poll_unchanged_cpu_s"] = sum(unchanged) / len(unchanged)


def summarize(runs: list[Run]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, _, _ in FIGURES:
        mp = [r.mp[key] for r in runs if key in r.mp]
        sov = [r.sov[key] for r in runs if key in r.sov]
        ratios = [
            x
            for r in runs
            if key in r.mp and key in r.sov
            for x in [accounting.ratio(r.sov[key], r.mp[key])]
            if x is not None
        ]
        out[key] = {
            "meshpilot": accounting.spread(mp) if mp else None,
            "sovereign": accounting.spread(sov) if sov else None,
            "ratio": accounting.spread(ratios) if ratios else None,
        }
    return out


def _fmt(s: dict[str, float] | None, digits: int = 3) -> str:
    if s is None:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}]"


def table(summary: dict[str, Any], title: str) -> str:
    lines = [title, f"{'figure':38} {'meshpilot':>24} {'sovereign':>24} {'sov/mp':>22}"]
    for key, label, unit in FIGURES:
        row = summary[key]
        lines.append(
            f"{label + ' (' + unit + ')':38} {_fmt(row['meshpilot']):>24} "
            f"{_fmt(row['sovereign']):>24} {_fmt(row['ratio'], 1):>22}"
        )
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> None:
    sov_exe = sovereign_setup.ensure_venv(Path(args.peer_venv))
    runs: list[Run] = []
    tmp = Path(tempfile.mkdtemp(prefix="peer-bench-"))
    connector = aiohttp.TCPConnector(limit=4)
    try:
        async with (
            asyncio.timeout(args.deadline),
            aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=120),
                # sovereign echoes every requested resource name in a response header.
                max_line_size=1 << 20,
                max_field_size=1 << 20,
            ) as session,
        ):
            for i in range(args.runs):
                run = Run(args, i, tmp, sov_exe)
                await run.go(session)
                runs.append(run)
                print(f"run {i + 1}/{args.runs}: load {run.load}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = summarize(runs)
    title = (
        f"meshpilot vs sovereign {sovereign_setup.VERSION}: {args.services} services x "
        f"{args.endpoints} endpoints, {args.runs} runs (median [min..max]), "
        f"load avg {[r.load for r in runs]}"
    )
    print(table(summary, title))
    write_result(args, title, summary, runs)


def write_result(
    args: argparse.Namespace, title: str, summary: dict[str, Any], runs: list[Run]
) -> None:
    result = {
        "title": title,
        "args": vars(args),
        "summary": summary,
        "runs": [
            {"meshpilot": r.mp, "sovereign": r.sov, "sizes": r.sizes, "load": r.load} for r in runs
        ],
    }
    out = Path(args.out or RESULTS / f"peer-{args.services}x{args.endpoints}.json")
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=20, help="meshpilot proxies per scenario")
    ap.add_argument("--peer-batch", type=int, default=1, help="sovereign proxies per scenario")
    ap.add_argument("--changes", type=int, default=3, help="endpoint changes per side")
    ap.add_argument("--workers", type=int, default=1, help="sovereign worker processes")
    ap.add_argument("--refresh", type=int, default=1, help="sovereign source refresh (s)")
    ap.add_argument("--idle", type=float, default=2.0, help="idle CPU window (s)")
    ap.add_argument("--deadline", type=float, default=900.0, help="bound on the whole run (s)")
    ap.add_argument("--peer-venv", default=str(PEER_VENV))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    for name in ("runs", "batch", "peer_batch", "changes", "workers", "refresh"):
        value = getattr(args, name)
        if not 1 <= value <= 1000:
            ap.error(f"--{name.replace('_', '-')}: expected 1..1000, got {value}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
