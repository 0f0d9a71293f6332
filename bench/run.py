"""`make bench`: the control plane against simulated proxies, and against a raw floor.

    python -m bench.run                          # 1000 services x 2000 sidecars, SotW
    python -m bench.run --namespaces 50          # spread over 50 namespaces
    python -m bench.run --namespaces 50 --sidecar-per-namespace
    python -m bench.run --delta                  # the same over Delta xDS
    python -m bench.run --quick                  # 100 x 200 over 10 namespaces (~1 min)
    python -m bench.run --empty-proxies --endpoints 1 --proxies 1000  # the old mesh

Phase 1, the control plane (`bench.server`) and proxy simulators (`bench.client`):
start-up, first config, initial sync, memory per proxy, endpoint-change and
DestinationRule-change convergence, full-push CPU, a proxy in a new namespace, and a
reconnect storm after a control-plane restart. Phase 2, the raw floor (`bench.floor`)
replays the bytes captured in phase 1 to as many simulated proxies. Figures go to
bench/results/MODE.json and a table on stdout; targets print PASS/FAIL and never fail
the process. See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import mesh, wire
from bench.procs import Child, CpuSampler, cpu_seconds, peak_rss_kb, rss_kb

RESULTS = Path(__file__).parent / "results"
EDS_B = wire.ENDPOINT.encode()

TARGET_READY_S = 2.0
TARGET_FIRST_CONFIG_MS = 150.0
TARGET_SYNC_S = 5.0
TARGET_P99_MS = 300.0
TARGET_DR_P99_MS = 500.0
TARGET_NEW_NAMESPACE_MS = 15.0
TARGET_RSS_KB = 200 * 1000 / 1024  # 200 kB
TARGET_CPU_RATIO = 1.5
TARGET_STORM_S = 10.0


@dataclass
class Options:
    services: int
    proxies: int
    namespaces: int
    endpoints: int
    sidecar_per_namespace: bool
    empty_proxies: bool
    delta: bool
    per_process: int
    changes: int
    interval: float
    dr_changes: int
    dr_interval: float
    full_pushes: int
    new_namespaces: int
    storm: bool
    phase_timeout: float
    sync_timeout: float
    floor: bool
    floor_only: bool
    profile: str
    out: Path | None
    deadline: float


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    if not s:
        return math.nan
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def log(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


class Runner:
    def __init__(self, opts: Options) -> None:
        self.o = opts
        self.server: Child | None = None
        self.children: list[Child] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="meshpilot-bench-"))
        self.results: dict[str, Any] = {}
        self.profilers: list[subprocess.Popen[bytes]] = []

    # --- processes -----------------------------------------------------------------------

    async def child(self, name: str, args: list[str]) -> Child:
        c = await Child.start(name, args)
        self.children.append(c)
        return c

    async def stop(self, children: list[Child]) -> None:
        for c in children:
            with contextlib.suppress(Exception):
                c.send("quit")
        await asyncio.gather(*(c.stop() for c in children), return_exceptions=True)
        for c in children:
            if c in self.children:
                self.children.remove(c)

    async def stop_all(self) -> None:
        for p in self.profilers:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        await self.stop(list(reversed(self.children)))

    def kill_all_now(self) -> None:
        for c in self.children:
            c.kill_now()
        for p in self.profilers:
            with contextlib.suppress(Exception):
                p.kill()

    def mesh_args(self) -> list[str]:
        o = self.o
        args = ["--services", str(o.services), "--namespaces", str(o.namespaces)]
        args += ["--endpoints", str(o.endpoints)]
        if o.sidecar_per_namespace:
            args.append("--sidecar-per-namespace")
        return args

    @property
    def layout(self) -> mesh.Mesh:
        o = self.o
        return mesh.Mesh(
            services=o.services,
            namespaces=o.namespaces,
            endpoints=o.endpoints,
            sidecars=not o.empty_proxies,
            sidecar_per_namespace=o.sidecar_per_namespace,
        )

    async def clients(self, port: int, capture: bool) -> list[Child]:
        n, per = self.o.proxies, self.o.per_process
        procs = max(1, math.ceil(n / per))
        sizes = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        out, first = [], 0
        for i, size in enumerate(sizes):
            args = ["-m", "bench.client", "--target", f"127.0.0.1:{port}", "--reconnect"]
            args += ["--first", str(first), "--count", str(size), *self.mesh_args()]
            if self.o.empty_proxies:
                args.append("--empty-proxies")
            if self.o.delta:
                args.append("--delta")
            if capture and i == 0:
                args.append("--capture")
            out.append(await self.child(f"client-{i}", args))
            first += size
        await asyncio.gather(*(c.expect("ready", 120) for c in out))
        return out

    # --- protocol helpers ----------------------------------------------------------------

    async def sync(self, clients: list[Child]) -> dict[str, Any]:
        """Connect every proxy; wait (bounded) until each has ACKed its whole config."""
        t_go = time.monotonic()
        for c in clients:
            c.send("go")
        try:
            events = await asyncio.gather(
                *(c.expect("synced", self.o.sync_timeout) for c in clients)
            )
        except TimeoutError:
            st = await self.status(clients)
            synced = sum(s["synced"] for s in st)
            return {
                "t_go": t_go,
                "t_done": time.monotonic(),
                "complete": False,
                "synced": synced,
                "seconds": math.nan,
                "timeout_s": self.o.sync_timeout,
            }
        last = max(e["last"] for e in events)
        return {
            "t_go": t_go,
            "t_done": last,
            "complete": True,
            "synced": self.o.proxies,
            "seconds": last - t_go,
            "first_s": min(e["first"] for e in events) - t_go,
            "p50_s": statistics.median(e["p50"] for e in events) - t_go,
            "decoded_per_process": max(e["decoded"] for e in events),
        }

    async def mark(self, clients: list[Child], phase: str, ack_log: bool = False) -> None:
        for c in clients:
            c.send("mark", phase=phase, ack_log=ack_log)
        await asyncio.gather(*(c.expect("marked", 30) for c in clients))

    async def status(self, clients: list[Child], version: str = "") -> list[dict[str, Any]]:
        return list(
            await asyncio.gather(
                *(c.request("status", "status", 30, version=version) for c in clients)
            )
        )

    async def settled(
        self,
        clients: list[Child],
        min_resp: int,
        quiet: float,
        within: float,
        version: str = "",
    ) -> float:
        """Wait until every proxy got >= min_resp responses since the mark (with
        `version`: at least one at that version) and no proxy got anything for `quiet`
        seconds; returns the time of the last ACK."""
        deadline = time.monotonic() + within
        while True:
            st = await self.status(clients, version)
            now = time.monotonic()
            errors = sum(s["errors"] for s in st)
            if errors:
                raise RuntimeError(f"{errors} proxy streams failed; see the client log")
            last_rx = max(s["last_rx"] for s in st)
            reached = not version or min(s["min_at_version"] for s in st) >= 1
            if all(s["min_resp"] >= min_resp for s in st) and reached and now - last_rx >= quiet:
                return max(s["last_ack"] for s in st)
            if now > deadline:
                got = sum(s["with_resp"] for s in st)
                raise TimeoutError(
                    f"push did not settle in {within}s: {got}/{self.o.proxies} proxies got "
                    f"a response, min {min(s['min_resp'] for s in st)} < {min_resp}, "
                    f"at version {min(s['min_at_version'] for s in st)}"
                    f"..{max(s['max_at_version'] for s in st)}"
                )
            await asyncio.sleep(0.1)

    async def quiet(
        self, clients: list[Child], sampler: CpuSampler, quiet: float, within: float
    ) -> None:
        """Wait (bounded) until no proxy got a response and the server used less than a
        tenth of a core over the last `quiet` seconds: a push in flight has ended."""
        deadline = time.monotonic() + within
        idle = self._idle(sampler)
        await asyncio.sleep(quiet)
        while time.monotonic() < deadline:
            st = await self.status(clients)
            now = time.monotonic()
            calm = sampler.rate(now - quiet, now) - idle < 0.1
            if calm and now - max(s["last_rx"] for s in st) >= quiet:
                return
            await asyncio.sleep(0.1)
        raise TimeoutError(f"the server was still busy after {within}s")

    async def ack_reports(
        self,
        clients: list[Child],
        changes: list[dict[str, Any]],
        type_url: str,
        within: float,
    ) -> list[dict[str, Any]]:
        """Per-process ACK reports, once every proxy that sees a change has ACKed it
        (or at the deadline: what is missing is reported as missing ACKs)."""
        versions = [c["version"] for c in changes]
        namespaces = [c["namespace"] for c in changes]
        deadline = time.monotonic() + within
        while True:
            reports = await asyncio.gather(
                *(
                    c.request(
                        "ack_report",
                        "ack_report",
                        60,
                        versions=versions,
                        namespaces=namespaces,
                        type_url=type_url,
                    )
                    for c in clients
                )
            )
            done = all(
                r["got"][i] >= r["expected"][i] for r in reports for i in range(len(versions))
            )
            if done or time.monotonic() > deadline:
                return list(reports)
            await asyncio.sleep(0.25)

    async def capture(self, client: Child, phase: str, name: str) -> dict[str, Any]:
        path = self.tmp / f"{name}.bin"
        return await client.request("capture", "captured", 120, phase=phase, path=str(path))

    def profile_start(self, pid: int, phase: str) -> subprocess.Popen[bytes] | None:
        if self.o.profile not in (phase, "all"):
            return None
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.path.exists(spy):
            log("--profile: py-spy not found (pip install py-spy into the venv)")
            return None
        out = RESULTS / f"profile-{self.mode}-{phase}.txt"
        p = subprocess.Popen(
            [spy, "record", "-p", str(pid), "-r", "200", "-f", "raw", "-o", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.profilers.append(p)
        time.sleep(0.5)  # let it attach before the phase starts
        return p

    def profile_stop(self, p: subprocess.Popen[bytes] | None, phase: str) -> None:
        if p is None:
            return
        p.send_signal(signal.SIGINT)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
        out = RESULTS / f"profile-{self.mode}-{phase}.txt"
        if out.exists():
            from bench.profile import summarize

            self.results.setdefault("profile", {})[phase] = summarize(out)
            log(f"profile of {phase} written to {out}")

    @property
    def mode(self) -> str:
        o = self.o
        name = f"{'delta' if o.delta else 'sotw'}-{o.services}x{o.proxies}"
        if o.namespaces > 1:
            name += f"-ns{o.namespaces}"
        if o.sidecar_per_namespace:
            name += "-sidecar"
        if o.empty_proxies:
            name += "-empty"
        return name

    # --- phase 1: the control plane ------------------------------------------------------

    async def start_server(self, port: int = 0) -> tuple[Child, dict[str, Any], float]:
        t0 = time.monotonic()
        args = ["-m", "bench.server", *self.mesh_args(), "--port", str(port)]
        server = await self.child("server", args)
        ready = await server.expect("ready", 900)
        return server, ready, time.monotonic() - t0

    async def control_plane(self) -> None:
        o = self.o
        log(f"starting the control plane with {o.services} services")
        server, ready, spawn_to_ready = await self.start_server()
        pid, port = ready["pid"], ready["port"]
        self.results["server"] = {
            k: ready[k] for k in ("parse_s", "store_s", "start_s", "objects", "errors", "rss_kb")
        }
        self.results["server"]["pid"] = pid
        self.results["server"]["spawn_to_ready_s"] = spawn_to_ready
        log(
            f"control plane pid {pid} on port {port}: {ready['objects']} objects, "
            f"ready {spawn_to_ready:.2f}s after spawn"
        )
        clients = await self.clients(port, capture=True)
        self.server = server
        sampler = CpuSampler(pid)
        sampler.start()
        try:
            await self._control_plane(server, clients, sampler)
            if o.storm and self.results["initial_sync"]["complete"]:
                await sampler.stop()
                # The storm bounds its own wait (--sync-timeout after ready) and then
                # records how far it got; this outer bound only covers a hung restart.
                await self.phase("storm", self.storm(clients, port), o.sync_timeout + 360)
        finally:
            await sampler.stop()
            await self.stop(clients)
            await self.stop([self.server] if self.server else [])

    async def phase(self, name: str, coro: Any, within: float | None = None) -> None:
        """Run one phase, bounded; a timeout is recorded and the run goes on."""
        try:
            async with asyncio.timeout(within or self.o.phase_timeout):
                await coro
        except TimeoutError as e:
            self.results[name] = {"error": f"timed out: {e}" if str(e) else "timed out"}
            log(f"phase {name} timed out ({within or self.o.phase_timeout:.0f}s)")
        except RuntimeError as e:
            # A child reported an error (e.g. the server gave up waiting for a busy
            # pusher): keep the figures so far and go on with the next phase.
            self.results[name] = {"error": str(e)[:300]}
            log(f"phase {name} failed: {e}")

    def _idle(self, sampler: CpuSampler) -> float:
        return float(self.results["server"].get("idle_cpu_cores", 0.0))

    async def _control_plane(
        self, server: Child, clients: list[Child], sampler: CpuSampler
    ) -> None:
        o, pid = self.o, server.pid
        await asyncio.sleep(1.0)
        t_idle = time.monotonic()
        await asyncio.sleep(1.0)
        self.results["server"]["idle_cpu_cores"] = sampler.rate(t_idle, time.monotonic())
        rss_before = rss_kb(pid)

        # 0. one proxy alone: the first full config after start
        if not o.empty_proxies and o.proxies < o.services * o.endpoints:
            await self.phase("first_config", self.first_config(server, clients, sampler))

        # 1. initial sync
        client_cpu0 = sum(cpu_seconds(c.pid) for c in clients)
        log(f"connecting {o.proxies} proxies in {len(clients)} processes")
        prof = self.profile_start(pid, "sync")
        sync = await self.sync(clients)
        self.profile_stop(prof, "sync")
        sync["cpu_s"] = sampler.between(sync["t_go"], sync["t_done"])
        sync["client_cpu_s"] = sum(cpu_seconds(c.pid) for c in clients) - client_cpu0
        sync["cpu_per_proxy_ms"] = sync["cpu_s"] / max(1, sync["synced"]) * 1000
        stats = await server.request("stats", "stats", 30)
        self.results["initial_sync"] = {k: v for k, v in sync.items() if not k.startswith("t_")}
        self.results["initial_sync"].update(build_s=stats["build_s"], gen_s=stats["gen_s"])
        if not sync["complete"]:
            self.results["initial_sync"]["rss_kb"] = rss_kb(pid)
            log(
                f"initial sync incomplete: {sync['synced']}/{o.proxies} proxies in "
                f"{o.sync_timeout:.0f}s (server CPU {sync['cpu_s']:.1f}s); "
                "the other phases are skipped"
            )
            return
        log(f"all proxies synced in {sync['seconds']:.2f}s (server CPU {sync['cpu_s']:.2f}s)")
        await asyncio.sleep(2.0)
        rss_after = rss_kb(pid)
        self.results["memory"] = {
            "rss_before_kb": rss_before,
            "rss_after_kb": rss_after,
            "per_proxy_kb": (rss_after - rss_before) / o.proxies,
        }
        initial = await self.capture(clients[0], "initial", "initial")
        self.results["sizes"] = sizes(initial)

        await self.phase("endpoint_convergence", self.endpoint_changes(server, clients, sampler))
        await self.phase("dr_convergence", self.dr_changes(server, clients, sampler))
        await self.phase("full_push", self.full_pushes(server, clients, sampler))
        await self.phase("new_namespace", self.new_namespaces(server, clients, sampler))
        final = await server.request("stats", "stats", 30)
        self.results["server"]["threads_cpu_s"] = final["threads"]
        self.results["server"]["cpu_total_s"] = final["cpu"]
        self.results["server"]["pushes"] = final["pushes"]
        self.results["server"]["peak_rss_kb"] = final["hwm_kb"]

    async def first_config(self, server: Child, clients: list[Child], sampler: CpuSampler) -> None:
        """One proxy (the sidecar of a workload no other simulated proxy fronts) connects
        to the idle server: wall time and server CPU until it ACKed everything."""
        who = self.layout.proxy(self.o.proxies)
        before = await server.request("stats", "stats", 30)
        clients[0].send("extra", index=self.o.proxies, proxy=dataclasses.asdict(who))
        ev = await clients[0].expect("extra_synced", 60)
        after = await server.request("stats", "stats", 30)
        t0, t1 = ev["t_start"], ev["t_synced"]
        self.results["first_config"] = {
            "wall_ms": (t1 - t0) * 1000,
            "cpu_ms": (sampler.between(t0, t1) - self._idle(sampler) * (t1 - t0)) * 1000,
            "build_s": after["build_s"] - before["build_s"],
            "gen_s": after["gen_s"] - before["gen_s"],
        }
        log(f"first config: {(t1 - t0) * 1000:.0f} ms wall")

    async def convergence(
        self,
        server: Child,
        clients: list[Child],
        sampler: CpuSampler,
        kind: str,
        n: int,
        interval: float,
        type_url: str,
    ) -> dict[str, Any]:
        await self.mark(clients, kind, ack_log=True)
        prof = self.profile_start(server.pid, "changes" if kind == "endpoint" else kind)
        server.send("changes", n=n, interval=interval, kind=kind)
        changes = [await server.expect("change", 60 + interval) for _ in range(n)]
        await server.expect("changes_done", 60)
        reports = await self.ack_reports(clients, changes, type_url, within=60)
        self.profile_stop(prof, "changes" if kind == "endpoint" else kind)
        lat_ms: list[float] = []
        missing = 0
        t_last = changes[0]["t"] if changes else 0.0
        for i, ch in enumerate(changes):
            got = sum(r["got"][i] for r in reports)
            expected = sum(r["expected"][i] for r in reports)
            worst = [r["worst"][i] for r in reports if r["worst"][i] is not None]
            if got < expected or not worst:
                missing += expected - got
                continue
            t_end = max(worst)
            t_last = max(t_last, t_end)
            lat_ms.append((t_end - ch["t"]) * 1000)
        # Pushes may overlap (convergence > spacing): charge the whole phase, once.
        t_first = changes[0]["t"] if changes else t_last
        idle = self._idle(sampler)
        cpu_phase = sampler.between(t_first, t_last) - idle * (t_last - t_first)
        receivers = [sum(r["expected"][i] for r in reports) for i in range(len(changes))]
        not_acked = [
            {"change": ch["what"], "namespace": ch["namespace"], "proxies": names}
            for i, ch in enumerate(changes)
            if (names := [x for r in reports for x in r["missing"][i]][:5])
        ]
        return {
            "changes": n,
            "interval_s": interval,
            "p50_ms": percentile(lat_ms, 50),
            "p99_ms": percentile(lat_ms, 99),
            "max_ms": max(lat_ms, default=math.nan),
            "missing_acks": missing,
            "not_acked_examples": not_acked,
            "responses_at_version": [
                sum(r["exact"][i] for r in reports) for i in range(len(changes))
            ],
            "proxies_per_change": statistics.median(receivers) if receivers else 0,
            "samples_ms": [round(x, 1) for x in lat_ms],
            "context_built_after_ms": [round(c["built_after"] * 1000, 1) for c in changes],
            "cpu_s": cpu_phase,
            "cpu_per_push_s": cpu_phase / len(changes) if changes else math.nan,
            "busy_fraction": cpu_phase / (t_last - t_first) if t_last > t_first else math.nan,
        }

    async def endpoint_changes(
        self, server: Child, clients: list[Child], sampler: CpuSampler
    ) -> None:
        o = self.o
        log(f"{o.changes} endpoint changes, one every {o.interval}s")
        res = await self.convergence(
            server, clients, sampler, "endpoint", o.changes, o.interval, wire.ENDPOINT
        )
        self.results["endpoint_convergence"] = res
        log(
            f"endpoint convergence p50 {res['p50_ms']:.0f} ms, p99 {res['p99_ms']:.0f} ms "
            f"({res['missing_acks']} ACKs missing, {res['proxies_per_change']:.0f} proxies "
            "per change)"
        )
        cap = await self.capture(clients[0], "endpoint", "changes")
        msgs = [m for m in wire.read_script(cap["path"]) if wire.envelope(m).type_url == EDS_B]
        if msgs:
            wire.write_script(str(self.tmp / "eds.bin"), msgs[:1])
        self.results["sizes"]["eds_push_response_bytes"] = len(msgs[0]) if msgs else 0

    async def dr_changes(self, server: Child, clients: list[Child], sampler: CpuSampler) -> None:
        o = self.o
        log(f"{o.dr_changes} DestinationRule changes, one every {o.dr_interval}s")
        res = await self.convergence(
            server, clients, sampler, "dr", o.dr_changes, o.dr_interval, wire.CLUSTER
        )
        self.results["dr_convergence"] = res
        log(
            f"DestinationRule change -> all CDS ACKed p50 {res['p50_ms']:.0f} ms, "
            f"p99 {res['p99_ms']:.0f} ms ({res['missing_acks']} ACKs missing)"
        )

    async def full_pushes(self, server: Child, clients: list[Child], sampler: CpuSampler) -> None:
        o, pid = self.o, server.pid
        pushes = []
        idle = self._idle(sampler)
        for r in range(o.full_pushes):
            await asyncio.sleep(0.5)
            await self.mark(clients, f"full{r}")
            before = await server.request("stats", "stats", 30)
            prof = self.profile_start(pid, "push") if r == 0 else None
            t0 = time.monotonic()
            server.send("add_service", index=r)
            pushed = await server.expect("pushed", 60)
            t_end = await self.settled(clients, 1, 1.0, 120, version=pushed["version"])
            self.profile_stop(prof, "push")
            after = await server.request("stats", "stats", 30)
            cpu = sampler.between(t0, t_end) - idle * (t_end - t0)
            pushes.append(
                {
                    "wall_s": t_end - t0,
                    "cpu_s": cpu,
                    "build_s": after["build_s"] - before["build_s"],
                    "gen_s": after["gen_s"] - before["gen_s"],
                    "context_built_after_s": pushed["built_after"],
                }
            )
            log(f"full push {r}: {t_end - t0:.2f}s wall, {cpu:.3f}s CPU")
        cap = await self.capture(clients[0], "full0", "full")
        self.results["sizes"]["full_push"] = {
            "messages": cap["messages"],
            "bytes": cap["bytes"],
            "per_type": cap["per_type"],
        }
        self.results["full_push"] = {
            "pushes": pushes,
            "cpu_s": statistics.median(p["cpu_s"] for p in pushes),
            "cpu_spread_s": [min(p["cpu_s"] for p in pushes), max(p["cpu_s"] for p in pushes)],
            "wall_s": statistics.median(p["wall_s"] for p in pushes),
            "build_s": statistics.median(p["build_s"] for p in pushes),
            "gen_s": statistics.median(p["gen_s"] for p in pushes),
        }

    async def new_namespaces(
        self, server: Child, clients: list[Child], sampler: CpuSampler
    ) -> None:
        """A namespace appears (Service, WorkloadEntry, Sidecar), the push it causes
        settles, then its workload's sidecar connects: server CPU for its full config."""
        o = self.o
        idle = self._idle(sampler)
        runs = []
        for k in range(o.new_namespaces):
            await self.mark(clients, f"fresh{k}")
            server.send("add_namespace", index=k)
            pushed = await server.expect("pushed", 60)
            await self.quiet(clients, sampler, 0.5, 120)
            before = await server.request("stats", "stats", 30)
            index = 10_000_000 + k
            clients[0].send("extra", index=index, proxy=pushed["proxy"])
            ev = await clients[0].expect("extra_synced", 60)
            t0, t1 = ev["t_start"], ev["t_synced"]
            # Let the server finish its side (the last ACK's handling) before reading.
            await asyncio.sleep(0.3)
            after = await server.request("stats", "stats", 30)
            cpu = sampler.between(t0, t1) - idle * (t1 - t0)
            runs.append(
                {
                    "wall_ms": (t1 - t0) * 1000,
                    "cpu_ms": cpu * 1000,
                    "build_s": after["build_s"] - before["build_s"],
                    "gen_s": after["gen_s"] - before["gen_s"],
                }
            )
            log(f"proxy in new namespace fresh-{k}: {cpu * 1000:.0f} ms server CPU")
        self.results["new_namespace"] = {
            "runs": runs,
            "cpu_ms": statistics.median(r["cpu_ms"] for r in runs),
            "cpu_spread_ms": [min(r["cpu_ms"] for r in runs), max(r["cpu_ms"] for r in runs)],
            "wall_ms": statistics.median(r["wall_ms"] for r in runs),
            "gen_s": statistics.median(r["gen_s"] for r in runs),
        }

    async def storm(self, clients: list[Child], port: int) -> None:
        """Kill the control plane by pid, start it again on the same port with the same
        config; every proxy reconnects with backoff. Measure until all are synced again."""
        o = self.o
        old = self.server
        assert old is not None
        streams = sum(s["streams"] for s in await self.status(clients))
        log(f"reconnect storm: killing the control plane (pid {old.pid}), {streams} streams")
        t_kill = time.monotonic()
        old.kill_now()
        await old.stop(5)
        self.children.remove(old)
        t_spawn = time.monotonic()
        server = await self.child(
            "server", ["-m", "bench.server", *self.mesh_args(), "--port", str(port)]
        )
        self.server = server
        sampler = CpuSampler(server.pid)
        sampler.start()
        peak = 0
        try:
            ready = await server.expect("ready", 300)
            t_ready = time.monotonic()
            log(f"restarted (pid {server.pid}) ready after {t_ready - t_spawn:.2f}s")
            deadline = t_ready + o.sync_timeout
            while True:
                st = await asyncio.gather(
                    *(
                        c.request("resync_status", "resync_status", 30, since=t_kill)
                        for c in clients
                    )
                )
                with contextlib.suppress(OSError):
                    peak = max(peak, rss_kb(server.pid))
                resynced = sum(s["resynced"] for s in st)
                if resynced >= streams or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            last = max((s["last"] for s in st), default=0.0)
            complete = resynced >= streams
            t_end = last if complete else time.monotonic()
            self.results["storm"] = {
                "streams": streams,
                "resynced": resynced,
                "complete": complete,
                "spawn_to_ready_s": t_ready - t_spawn,
                "ready_to_all_acked_s": (t_end - t_ready) if complete else math.nan,
                "spawn_to_all_acked_s": (t_end - t_spawn) if complete else math.nan,
                "reconnect_attempts": sum(s["reconnects"] for s in st),
                "stream_errors": sum(s["errors"] for s in st),
                "server_cpu_s": sampler.between(t_spawn, t_end),
                "peak_rss_kb": max(peak, peak_rss_kb(server.pid)),
                "start_rss_kb": ready["rss_kb"],
            }
            log(
                f"reconnect storm: {resynced}/{streams} resynced, "
                f"{self.results['storm']['ready_to_all_acked_s']:.2f}s after ready"
            )
        finally:
            await sampler.stop()

    # --- phase 2: the raw floor ----------------------------------------------------------

    async def floor(self) -> None:
        o = self.o
        if not (self.tmp / "initial.bin").exists():
            log("no captured initial config (the initial sync did not finish): no floor")
            return
        log("starting the raw grpc.aio floor")
        floor = await self.child("floor", ["-m", "bench.floor"])
        ready = await floor.expect("ready", 120)
        pid, port = ready["pid"], ready["port"]
        scripts = {}
        for phase in ("initial", "full", "eds"):
            path = self.tmp / f"{phase}.bin"
            if path.exists():
                loaded = await floor.request("load", "loaded", 60, phase=phase, path=str(path))
                scripts[phase] = loaded["messages"]
        clients = await self.clients(port, capture=False)
        sampler = CpuSampler(pid)
        sampler.start()
        try:
            await asyncio.sleep(1.0)
            rss_before = rss_kb(pid)
            sync = await self.sync(clients)
            sync["cpu_s"] = sampler.between(sync["t_go"], sync["t_done"])
            await asyncio.sleep(2.0)
            rss_after = rss_kb(pid)
            t_idle = time.monotonic()
            await asyncio.sleep(1.0)
            idle = sampler.rate(t_idle, time.monotonic())
            res: dict[str, Any] = {
                "initial_sync_s": sync["seconds"],
                "initial_sync_cpu_s": sync["cpu_s"],
                "per_proxy_kb": (rss_after - rss_before) / o.proxies,
                "idle_cpu_cores": idle,
                "messages": scripts,
            }
            log(f"floor: initial sync {sync['seconds']:.2f}s, CPU {sync['cpu_s']:.2f}s")
            for phase, reps in (("full", o.full_pushes), ("eds", 5)):
                if phase not in scripts:
                    continue
                cpus, walls = [], []
                for r in range(reps):
                    await asyncio.sleep(0.3)
                    await self.mark(clients, f"floor-{phase}{r}")
                    t0 = time.monotonic()
                    floor.send("push", phase=phase)
                    t_end = await self.settled(clients, scripts[phase], 0.3, 300)
                    cpus.append(sampler.between(t0, t_end) - idle * (t_end - t0))
                    walls.append(t_end - t0)
                res[f"{phase}_push_cpu_s"] = statistics.median(cpus)
                res[f"{phase}_push_wall_s"] = statistics.median(walls)
                res[f"{phase}_push_cpu_all_s"] = [round(c, 4) for c in cpus]
                log(f"floor {phase} push: {statistics.median(cpus):.3f}s CPU (median)")
            self.results["floor"] = res
        finally:
            await sampler.stop()
            await self.stop(clients)
            await self.stop([floor])

    def synthetic_scripts(self) -> None:
        from bench import synthetic

        for phase, msgs in synthetic.scripts(self.o.services, self.o.delta).items():
            wire.write_script(str(self.tmp / f"{phase}.bin"), msgs)

    # --- everything ----------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        o = self.o
        self.results["config"] = {
            "services": o.services,
            "proxies": o.proxies,
            "namespaces": o.namespaces,
            "endpoints_per_service": o.endpoints,
            "sidecar_per_namespace": o.sidecar_per_namespace,
            "proxies_are_sidecars": not o.empty_proxies,
            "xds": "delta" if o.delta else "sotw",
            "proxies_per_process": o.per_process,
            "changes": o.changes,
            "change_interval_s": o.interval,
            "dr_changes": o.dr_changes,
            "dr_interval_s": o.dr_interval,
            "full_pushes": o.full_pushes,
            "new_namespaces": o.new_namespaces,
        }
        self.results["machine"] = machine()
        load = os.getloadavg()[0]
        if load > (os.cpu_count() or 1) * 0.5:
            log(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs; wall-clock figures")
            log("will be inflated by other processes (CPU-second figures much less so)")
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(o.deadline):
                if o.floor_only:
                    self.synthetic_scripts()
                else:
                    await self.control_plane()
                if o.floor or o.floor_only:
                    await self.floor()
        except TimeoutError:
            # Keep what was measured: the figures so far are written with the mark.
            self.results["aborted"] = f"the whole run passed --deadline {o.deadline:.0f}s"
            log(self.results["aborted"])
        finally:
            await self.stop_all()
            shutil.rmtree(self.tmp, ignore_errors=True)
        self.results["run_s"] = round(time.monotonic() - t0, 1)
        self.results["machine"]["loadavg_end"] = os.getloadavg()[0]
        self.results["targets"] = targets(self.results)
        return self.results


# --- figures -----------------------------------------------------------------------------


def sizes(captured: dict[str, Any]) -> dict[str, Any]:
    per = captured["per_type"]

    def mean(t: str) -> float:
        return per.get(t, {}).get("resource_bytes_mean", 0)

    def total(t: str) -> int:
        return per.get(t, {}).get("response_bytes", 0)

    return {
        "cluster_bytes": mean("cds"),
        "cla_bytes": mean("eds"),
        "listener_bytes": mean("lds"),
        "route_config_bytes": mean("rds"),
        "route_config_bytes_max": per.get("rds", {}).get("resource_bytes_max", 0),
        "initial_bytes_per_proxy": captured["bytes"],
        "initial_messages_per_proxy": captured["messages"],
        "initial_response_bytes": {t: total(t) for t in ("cds", "eds", "lds", "rds")},
        "initial_resources": {t: per.get(t, {}).get("resources", 0) for t in per},
    }


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    out = []

    def add(name: str, value: float, limit: float, unit: str) -> None:
        ok = value == value and value <= limit  # NaN fails
        out.append({"name": name, "value": value, "target": limit, "unit": unit, "pass": ok})

    def ok(phase: str) -> bool:
        return phase in r and "error" not in r[phase]

    def converged(phase: str) -> float:
        return float(r[phase]["p99_ms"]) if not r[phase]["missing_acks"] else math.nan

    if "server" in r and "spawn_to_ready_s" in r["server"]:
        add("start to ready", r["server"]["spawn_to_ready_s"], TARGET_READY_S, "s")
    if ok("first_config"):
        add("first full config", r["first_config"]["wall_ms"], TARGET_FIRST_CONFIG_MS, "ms")
    if "initial_sync" in r:
        add("initial sync", r["initial_sync"]["seconds"], TARGET_SYNC_S, "s")
    if ok("endpoint_convergence"):
        add("endpoint convergence p99", converged("endpoint_convergence"), TARGET_P99_MS, "ms")
    if ok("dr_convergence"):
        add("DestinationRule convergence p99", converged("dr_convergence"), TARGET_DR_P99_MS, "ms")
    if ok("new_namespace"):
        add(
            "new-namespace proxy CPU",
            r["new_namespace"]["cpu_ms"],
            TARGET_NEW_NAMESPACE_MS,
            "ms",
        )
    if "memory" in r:
        add("RSS per proxy", r["memory"]["per_proxy_kb"], TARGET_RSS_KB, "KiB")
    if ok("full_push") and r.get("floor", {}).get("full_push_cpu_s"):
        ratio = r["full_push"]["cpu_s"] / r["floor"]["full_push_cpu_s"]
        r["full_push"]["floor_ratio"] = ratio
        add("full push CPU / raw floor", ratio, TARGET_CPU_RATIO, "x")
    if ok("storm"):
        add(
            "reconnect storm, ready -> all ACKed",
            r["storm"]["ready_to_all_acked_s"],
            TARGET_STORM_S,
            "s",
        )
    return out


def machine() -> dict[str, Any]:
    import google.protobuf
    import grpc

    commit = ""
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    return {
        "loadavg_start": os.getloadavg()[0],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "protobuf": google.protobuf.__version__,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def table(r: dict[str, Any]) -> str:
    c = r["config"]
    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: str, note: str = "") -> None:
        rows.append((name, value, note))

    def verdict(name: str) -> str:
        for t in r["targets"]:
            if t["name"] == name:
                mark = "PASS" if t["pass"] else "FAIL"
                return f"{mark} (target <= {t['target']:.4g} {t['unit']})"
        return ""

    def failed(phase: str) -> bool:
        if phase in r and "error" in r[phase]:
            row(phase.replace("_", " "), "-", r[phase]["error"][:70])
            return True
        return phase not in r

    if "server" in r and "spawn_to_ready_s" in r["server"]:
        sv = r["server"]
        row("start to ready", f"{sv['spawn_to_ready_s']:.2f} s", verdict("start to ready"))
        row(
            "  parse / store / start()",
            f"{sv['parse_s']:.2f} / {sv['store_s']:.2f} / {sv['start_s']:.2f} s",
            f"{sv['objects']} objects",
        )
    if not failed("first_config"):
        fc = r["first_config"]
        row(
            "first full config (one proxy)", f"{fc['wall_ms']:.0f} ms", verdict("first full config")
        )
        row("  server CPU for it", f"{fc['cpu_ms']:.0f} ms")
    if "initial_sync" in r:
        s = r["initial_sync"]
        if s["complete"]:
            row("initial sync (all ACKed)", f"{s['seconds']:.2f} s", verdict("initial sync"))
            row("  first / median proxy synced", f"{s['first_s']:.2f} / {s['p50_s']:.2f} s")
        else:
            row(
                "initial sync (all ACKed)",
                f"{s['synced']}/{c['proxies']}",
                f"FAIL: not done in {s['timeout_s']:.0f} s; later phases skipped",
            )
        row(
            "  server CPU during sync",
            f"{s['cpu_s']:.2f} s",
            f"{s['cpu_per_proxy_ms']:.1f} ms per proxy synced",
        )
        row("  proxy simulators' CPU", f"{s['client_cpu_s']:.2f} s")
    for phase, label, target in (
        ("endpoint_convergence", "endpoint change", "endpoint convergence p99"),
        ("dr_convergence", "DestinationRule change", "DestinationRule convergence p99"),
    ):
        if failed(phase):
            continue
        e = r[phase]
        row(f"{label} -> all ACKed p50", f"{e['p50_ms']:.0f} ms", "incl. 100 ms debounce")
        row(f"{label} -> all ACKed p99", f"{e['p99_ms']:.0f} ms", verdict(target))
        row(
            "  missing ACKs / proxies per change",
            f"{e['missing_acks']} / {e['proxies_per_change']:.0f}",
        )
        row(
            "  server CPU per push",
            f"{e['cpu_per_push_s'] * 1000:.0f} ms",
            f"server busy {e['busy_fraction']:.0%} of the phase",
        )
    if "memory" in r:
        m = r["memory"]
        row(
            "control plane RSS per proxy",
            f"{m['per_proxy_kb']:.0f} KiB",
            verdict("RSS per proxy"),
        )
        row(
            "  RSS before / after connecting",
            f"{m['rss_before_kb'] / 1024:.0f} / {m['rss_after_kb'] / 1024:.0f} MiB",
        )
    if not failed("full_push"):
        f = r["full_push"]
        lo, hi = f["cpu_spread_s"]
        row("full push (new Service) wall", f"{f['wall_s']:.2f} s", "incl. debounce")
        row(
            "full push server CPU",
            f"{f['cpu_s']:.3f} s",
            f"median of {len(f['pushes'])}, {lo:.3f}-{hi:.3f}",
        )
        row("  context build / translation", f"{f['build_s']:.3f} / {f['gen_s']:.3f} s")
    if not failed("new_namespace"):
        nn = r["new_namespace"]
        lo, hi = nn["cpu_spread_ms"]
        row(
            "proxy in a new namespace, server CPU",
            f"{nn['cpu_ms']:.0f} ms",
            f"{verdict('new-namespace proxy CPU')}; {lo:.0f}-{hi:.0f} ms",
        )
        row(
            "  its wall time / translation", f"{nn['wall_ms']:.0f} ms / {nn['gen_s'] * 1000:.0f} ms"
        )
    if not failed("storm"):
        st = r["storm"]
        if st["complete"]:
            row(
                "reconnect storm: ready -> all ACKed",
                f"{st['ready_to_all_acked_s']:.2f} s",
                verdict("reconnect storm, ready -> all ACKed"),
            )
        else:
            row("reconnect storm", f"{st['resynced']}/{st['streams']}", "FAIL: not all resynced")
        row(
            "  restart: spawn -> ready / peak RSS",
            f"{st['spawn_to_ready_s']:.2f} s / {st['peak_rss_kb'] / 1024:.0f} MiB",
            f"{st['reconnect_attempts']} reconnects, {st['stream_errors']} failed streams",
        )
    if "floor" in r:
        fl = r["floor"]
        if "full_push_cpu_s" in fl:
            row("raw floor CPU, same push", f"{fl['full_push_cpu_s']:.3f} s")
        if "full_push" in r and "floor_ratio" in r["full_push"]:
            row(
                "full push CPU / raw floor",
                f"{r['full_push']['floor_ratio']:.2f} x",
                verdict("full push CPU / raw floor"),
            )
        if "eds_push_cpu_s" in fl:
            note = ""
            ec = r.get("endpoint_convergence", {})
            # The floor sends the EDS push to every stream: compare only when every
            # proxy got each change (no Sidecars).
            if ec.get("proxies_per_change", 0) >= c["proxies"]:
                ratio = ec["cpu_per_push_s"] / fl["eds_push_cpu_s"]
                note = f"control plane {ratio:.2f} x"
            elif ec:
                note = "to all streams; the control plane's reached fewer"
            row("raw floor CPU, endpoint push", f"{fl['eds_push_cpu_s'] * 1000:.0f} ms", note)
        row(
            "raw floor initial sync",
            f"{fl['initial_sync_s']:.2f} s",
            f"CPU {fl['initial_sync_cpu_s']:.2f} s",
        )
        row("raw floor RSS per stream", f"{fl['per_proxy_kb']:.0f} KiB")
    if "sizes" in r:
        z = r["sizes"]
        row("bytes per Cluster", f"{z['cluster_bytes']:.0f} B")
        row("bytes per ClusterLoadAssignment", f"{z['cla_bytes']:.0f} B")
        row("bytes per Listener", f"{z['listener_bytes']:.0f} B")
        row(
            "bytes per RouteConfiguration",
            f"{z['route_config_bytes']:.0f} B",
            f"{z['initial_resources'].get('rds', 0)} route config(s)",
        )
        row("initial config per proxy", f"{z['initial_bytes_per_proxy'] / 1024:.0f} KiB")
    m = r["machine"]
    title = (
        f"meshpilot bench: {c['services']} services x {c['proxies']} "
        f"{'sidecars' if c['proxies_are_sidecars'] else 'empty proxies'}, "
        f"{c['namespaces']} ns{' with Sidecars' if c['sidecar_per_namespace'] else ''}, "
        f"{c['xds']}, {m['cpus']} CPUs, commit {m['commit']}, "
        f"load {m['loadavg_start']:.1f}->{m.get('loadavg_end', 0):.1f}"
    )
    w0 = max(len(x[0]) for x in rows) if rows else 10
    w1 = max(len(x[1]) for x in rows) if rows else 10
    lines = [title, "-" * len(title)]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {n}".rstrip() for a, b, n in rows]
    return "\n".join(lines)


def options(argv: list[str] | None = None) -> Options:
    ap = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    ap.add_argument("--services", type=int, default=None, help="default 1000 (quick: 100)")
    ap.add_argument("--proxies", type=int, default=None, help="default 2000 (quick: 200)")
    ap.add_argument(
        "--namespaces", type=int, default=None, help="spread over N namespaces (quick: 10)"
    )
    ap.add_argument("--endpoints", type=int, default=3, help="WorkloadEntries per Service")
    ap.add_argument(
        "--sidecar-per-namespace",
        action="store_true",
        help="each namespace a Sidecar importing itself, istio-system and 5 others",
    )
    ap.add_argument(
        "--empty-proxies",
        action="store_true",
        help="proxies that are no workload's sidecar (the benchmark's first mode)",
    )
    ap.add_argument("--delta", action="store_true", help="Delta xDS instead of SotW")
    ap.add_argument("--quick", action="store_true", help="100 x 200 over 10 namespaces, ~1 min")
    ap.add_argument("--per-process", type=int, default=250, help="proxy streams per process")
    ap.add_argument("--changes", type=int, default=None, help="endpoint changes (default 20)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between changes")
    ap.add_argument(
        "--dr-changes", type=int, default=None, help="DestinationRule changes (default 10)"
    )
    ap.add_argument("--dr-interval", type=float, default=1.0)
    ap.add_argument("--full-pushes", type=int, default=None, help="default 3")
    ap.add_argument("--new-namespaces", type=int, default=3, help="proxies in new namespaces")
    ap.add_argument("--no-storm", action="store_true", help="skip the reconnect storm")
    ap.add_argument("--sync-timeout", type=float, default=None, help="default 150 s (quick 60)")
    ap.add_argument("--phase-timeout", type=float, default=120.0, help="bound of each phase")
    ap.add_argument("--no-floor", action="store_true", help="skip the raw floor phase")
    ap.add_argument(
        "--floor-only", action="store_true", help="only the floor, on synthetic responses"
    )
    ap.add_argument(
        "--profile",
        choices=("none", "sync", "changes", "dr", "push", "all"),
        default="none",
        help="py-spy the control plane during a phase (pip install py-spy)",
    )
    ap.add_argument("--out", type=Path, default=None, help="results file (default: by mode)")
    ap.add_argument(
        "--deadline", type=float, default=None, help="stop the run after this (default 600 s)"
    )
    a = ap.parse_args(argv)
    quick = a.quick
    opts = Options(
        services=a.services or (100 if quick else 1000),
        proxies=a.proxies or (200 if quick else 2000),
        namespaces=a.namespaces or (10 if quick else 1),
        endpoints=a.endpoints,
        sidecar_per_namespace=a.sidecar_per_namespace,
        empty_proxies=a.empty_proxies,
        delta=a.delta,
        per_process=a.per_process,
        changes=a.changes or (10 if quick else 20),
        interval=a.interval,
        dr_changes=a.dr_changes or (5 if quick else 10),
        dr_interval=a.dr_interval,
        full_pushes=a.full_pushes or 3,
        new_namespaces=a.new_namespaces,
        storm=not a.no_storm,
        phase_timeout=a.phase_timeout,
        sync_timeout=a.sync_timeout or (60.0 if quick else 150.0),
        floor=not a.no_floor,
        floor_only=a.floor_only,
        profile=a.profile,
        out=a.out,
        deadline=a.deadline or (240.0 if quick else 600.0),
    )
    try:
        mesh.Mesh(
            services=opts.services,
            namespaces=opts.namespaces,
            endpoints=opts.endpoints,
            sidecars=not opts.empty_proxies,
            sidecar_per_namespace=opts.sidecar_per_namespace,
        ).check(opts.proxies)
    except ValueError as e:
        ap.error(str(e))
    return opts


async def amain(opts: Options) -> int:
    runner = Runner(opts)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGINT too: a runner started in the background inherits it ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, main_task.cancel)
    try:
        results = await runner.run()
    except BaseException:
        runner.kill_all_now()
        raise
    RESULTS.mkdir(exist_ok=True)
    name = ("floor-" if opts.floor_only else "") + runner.mode
    out = opts.out or RESULTS / f"{name}.json"
    out.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    print(table(results))
    for t in results["targets"]:
        if not t["pass"]:
            log(f"target missed: {t['name']} = {t['value']:.3g} {t['unit']} > {t['target']:.4g}")
    log(f"results written to {out}")
    return 0


def main(argv: list[str] | None = None) -> None:
    opts = options(argv)
    try:
        code = asyncio.run(amain(opts))
    except (KeyboardInterrupt, asyncio.CancelledError):
        log("interrupted; every started process was stopped")
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
