"""`make bench`: the control plane against simulated proxies, and against a raw floor.

    python -m bench.run                          # 1000 services x 1000 proxies, SotW
    python -m bench.run --delta                  # the same over Delta xDS
    python -m bench.run --quick                  # 100 x 100, for a smoke test
    python -m bench.run --services 500 --proxies 2000 --per-process 400

Phase 1, the control plane (`bench.server`) and proxy simulators (`bench.client`):
initial sync, endpoint-change convergence, memory per proxy, full-push CPU. Phase 2,
the raw floor (`bench.floor`) replays the bytes captured in phase 1 to as many
simulated proxies. Figures go to bench/results/MODE-SxP.json and a table on stdout.
See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

from bench import wire
from bench.procs import Child, CpuSampler, cpu_seconds, rss_kb

RESULTS = Path(__file__).parent / "results"

TARGET_SYNC_S = 10.0
TARGET_P99_MS = 400.0
TARGET_RSS_KB = 500.0
TARGET_CPU_RATIO = 2.0


@dataclass
class Options:
    services: int
    proxies: int
    delta: bool
    per_process: int
    changes: int
    interval: float
    full_pushes: int
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

    async def clients(self, port: int, capture: bool) -> list[Child]:
        n, per = self.o.proxies, self.o.per_process
        procs = max(1, math.ceil(n / per))
        sizes = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
        out, first = [], 0
        for i, size in enumerate(sizes):
            args = ["-m", "bench.client", "--target", f"127.0.0.1:{port}"]
            args += ["--first", str(first), "--count", str(size)]
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
        t_go = time.monotonic()
        for c in clients:
            c.send("go")
        events = await asyncio.gather(*(c.expect("synced", self.o.sync_timeout) for c in clients))
        last = max(e["last"] for e in events)
        return {
            "t_go": t_go,
            "t_done": last,
            "seconds": last - t_go,
            "first_s": min(e["first"] for e in events) - t_go,
            "p50_s": statistics.median(e["p50"] for e in events) - t_go,
            "decoded_per_process": max(e["decoded"] for e in events),
        }

    async def mark(self, clients: list[Child], phase: str, eds_log: bool = False) -> None:
        for c in clients:
            c.send("mark", phase=phase, eds_log=eds_log)
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
        """Wait until every proxy got >= min_resp responses since the mark, and (with
        `version`) as many responses at that version as the proxy that got the most,
        and no proxy got anything for `quiet` seconds; returns the time of the last ACK.
        """
        deadline = time.monotonic() + within
        while True:
            st = await self.status(clients, version)
            now = time.monotonic()
            errors = sum(s["errors"] for s in st)
            if errors:
                raise RuntimeError(f"{errors} proxy streams failed; see the client log")
            last_rx = max(s["last_rx"] for s in st)
            even = not version or (
                min(s["min_at_version"] for s in st) >= 1
                and min(s["min_at_version"] for s in st) == max(s["max_at_version"] for s in st)
            )
            if all(s["min_resp"] >= min_resp for s in st) and even and now - last_rx >= quiet:
                return max(s["last_ack"] for s in st)
            if now > deadline:
                got = sum(s["with_resp"] for s in st)
                raise TimeoutError(
                    f"push did not settle in {within}s: {got}/{self.o.proxies} proxies got "
                    f"a response, min {min(s['min_resp'] for s in st)} < {min_resp}"
                )
            await asyncio.sleep(0.1)

    async def eds_reports(
        self, clients: list[Child], versions: list[str], within: float
    ) -> list[dict[str, Any]]:
        """Per-process EDS ACK reports, once every proxy has ACKed every change (or at
        the deadline: what is missing is reported as missing ACKs)."""
        deadline = time.monotonic() + within
        while True:
            reports = await asyncio.gather(
                *(c.request("eds_report", "eds_report", 60, versions=versions) for c in clients)
            )
            got = [sum(r["got"][i] for r in reports) for i in range(len(versions))]
            if all(g >= self.o.proxies for g in got) or time.monotonic() > deadline:
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
        return f"{'delta' if self.o.delta else 'sotw'}-{self.o.services}x{self.o.proxies}"

    # --- phase 1: the control plane ------------------------------------------------------

    async def control_plane(self) -> None:
        o = self.o
        log(f"starting the control plane with {o.services} services")
        server = await self.child("server", ["-m", "bench.server", "--services", str(o.services)])
        ready = await server.expect("ready", 900)
        pid, port = ready["pid"], ready["port"]
        self.results["server"] = {
            k: ready[k] for k in ("parse_s", "store_s", "start_s", "objects", "errors", "rss_kb")
        }
        self.results["server"]["pid"] = pid
        log(f"control plane pid {pid} on port {port}: {ready['objects']} objects")
        clients = await self.clients(port, capture=True)
        sampler = CpuSampler(pid)
        sampler.start()
        try:
            await self._control_plane(server, clients, sampler)
        finally:
            await sampler.stop()
            await self.stop(clients)
            await self.stop([server])

    async def _control_plane(
        self, server: Child, clients: list[Child], sampler: CpuSampler
    ) -> None:
        o, pid = self.o, server.pid
        await asyncio.sleep(1.0)
        rss_before = rss_kb(pid)
        client_cpu0 = sum(cpu_seconds(c.pid) for c in clients)

        # 1. initial sync
        log(f"connecting {o.proxies} proxies in {len(clients)} processes")
        prof = self.profile_start(pid, "sync")
        sync = await self.sync(clients)
        self.profile_stop(prof, "sync")
        sync["cpu_s"] = sampler.between(sync["t_go"], sync["t_done"])
        sync["client_cpu_s"] = sum(cpu_seconds(c.pid) for c in clients) - client_cpu0
        log(f"all proxies synced in {sync['seconds']:.2f}s (server CPU {sync['cpu_s']:.2f}s)")
        await asyncio.sleep(2.0)
        rss_after = rss_kb(pid)
        t_idle = time.monotonic()
        await asyncio.sleep(1.0)
        idle = sampler.rate(t_idle, time.monotonic())
        stats = await server.request("stats", "stats", 30)
        self.results["initial_sync"] = {k: v for k, v in sync.items() if not k.startswith("t_")}
        self.results["initial_sync"].update(build_s=stats["build_s"], gen_s=stats["gen_s"])
        self.results["memory"] = {
            "rss_before_kb": rss_before,
            "rss_after_kb": rss_after,
            "per_proxy_kb": (rss_after - rss_before) / o.proxies,
        }
        self.results["server"]["idle_cpu_cores"] = idle
        initial = await self.capture(clients[0], "initial", "initial")
        self.results["sizes"] = sizes(initial)

        # 2. endpoint changes through the store
        log(f"{o.changes} endpoint changes, one every {o.interval}s")
        await self.mark(clients, "changes", eds_log=True)
        prof = self.profile_start(pid, "changes")
        server.send("changes", n=o.changes, interval=o.interval)
        changes = [await server.expect("change", 60 + o.interval) for _ in range(o.changes)]
        await server.expect("changes_done", 60)
        versions = [c["version"] for c in changes]
        reports = await self.eds_reports(clients, versions, within=120)
        self.profile_stop(prof, "changes")
        lat_ms: list[float] = []
        missing = 0
        t_last = changes[0]["t"] if changes else 0.0
        for i, ch in enumerate(changes):
            got = sum(r["got"][i] for r in reports)
            worst = [r["worst"][i] for r in reports if r["worst"][i] is not None]
            if got < o.proxies or not worst:
                missing += o.proxies - got
                continue
            t_end = max(worst)
            t_last = max(t_last, t_end)
            lat_ms.append((t_end - ch["t"]) * 1000)
        # Pushes may overlap (convergence > spacing): charge the whole phase, once.
        t_first = changes[0]["t"] if changes else t_last
        cpu_phase = sampler.between(t_first, t_last) - idle * (t_last - t_first)
        self.results["endpoint_convergence"] = {
            "changes": o.changes,
            "interval_s": o.interval,
            "p50_ms": percentile(lat_ms, 50),
            "p99_ms": percentile(lat_ms, 99),
            "max_ms": max(lat_ms, default=math.nan),
            "missing_acks": missing,
            "samples_ms": [round(x, 1) for x in lat_ms],
            "context_built_after_ms": [round(c["built_after"] * 1000, 1) for c in changes],
            "cpu_s": cpu_phase,
            "cpu_per_push_s": cpu_phase / len(changes) if changes else math.nan,
            "busy_fraction": cpu_phase / (t_last - t_first) if t_last > t_first else math.nan,
        }
        log(
            f"endpoint convergence p50 {percentile(lat_ms, 50):.0f} ms, "
            f"p99 {percentile(lat_ms, 99):.0f} ms ({missing} ACKs missing)"
        )
        cap = await self.capture(clients[0], "changes", "changes")
        msgs = wire.read_script(cap["path"])
        if msgs:
            wire.write_script(str(self.tmp / "eds.bin"), msgs[:1])
        self.results["sizes"]["eds_push_response_bytes"] = len(msgs[0]) if msgs else 0

        # 3. full pushes: a new Service (and its endpoint) reaches every proxy
        pushes = []
        for r in range(o.full_pushes):
            await asyncio.sleep(0.5)
            await self.mark(clients, f"full{r}")
            before = await server.request("stats", "stats", 30)
            prof = self.profile_start(pid, "push") if r == 0 else None
            t0 = time.monotonic()
            server.send("add_service", index=o.services + r)
            pushed = await server.expect("pushed", 60)
            t_end = await self.settled(clients, 1, 1.0, 300, version=pushed["version"])
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
            "wall_s": statistics.median(p["wall_s"] for p in pushes),
            "build_s": statistics.median(p["build_s"] for p in pushes),
            "gen_s": statistics.median(p["gen_s"] for p in pushes),
        }
        final = await server.request("stats", "stats", 30)
        self.results["server"]["threads_cpu_s"] = final["threads"]
        self.results["server"]["cpu_total_s"] = final["cpu"]
        self.results["server"]["pushes"] = final["pushes"]

    # --- phase 2: the raw floor ----------------------------------------------------------

    async def floor(self) -> None:
        o = self.o
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
            for phase, reps in (("full", o.full_pushes), ("eds", max(5, o.full_pushes))):
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
            "xds": "delta" if o.delta else "sotw",
            "proxies_per_process": o.per_process,
            "changes": o.changes,
            "change_interval_s": o.interval,
            "full_pushes": o.full_pushes,
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

    if "initial_sync" in r:
        add("initial sync", r["initial_sync"]["seconds"], TARGET_SYNC_S, "s")
    if "endpoint_convergence" in r:
        ec = r["endpoint_convergence"]
        add(
            "endpoint convergence p99",
            ec["p99_ms"] if not ec["missing_acks"] else math.nan,
            TARGET_P99_MS,
            "ms",
        )
    if "memory" in r:
        add("RSS per proxy", r["memory"]["per_proxy_kb"], TARGET_RSS_KB, "KiB")
    if "full_push" in r and r.get("floor", {}).get("full_push_cpu_s"):
        ratio = r["full_push"]["cpu_s"] / r["floor"]["full_push_cpu_s"]
        r["full_push"]["floor_ratio"] = ratio
        add("full push CPU / raw floor", ratio, TARGET_CPU_RATIO, "x")
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
                return f"{mark} (target <= {t['target']:g} {t['unit']})"
        return ""

    if "initial_sync" in r:
        s = r["initial_sync"]
        row("initial sync (all ACKed)", f"{s['seconds']:.2f} s", verdict("initial sync"))
        row("  first / median proxy synced", f"{s['first_s']:.2f} / {s['p50_s']:.2f} s")
        row("  server CPU during sync", f"{s['cpu_s']:.2f} s")
        row("  proxy simulators' CPU", f"{s['client_cpu_s']:.2f} s")
    if "endpoint_convergence" in r:
        e = r["endpoint_convergence"]
        row("endpoint change -> all ACKed p50", f"{e['p50_ms']:.0f} ms", "incl. 100 ms debounce")
        row(
            "endpoint change -> all ACKed p99",
            f"{e['p99_ms']:.0f} ms",
            verdict("endpoint convergence p99"),
        )
        row("  missing ACKs", str(e["missing_acks"]))
        row(
            "  server CPU per endpoint push",
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
    if "full_push" in r:
        f = r["full_push"]
        row("full push (new Service) wall", f"{f['wall_s']:.2f} s", "incl. debounce")
        row("full push server CPU", f"{f['cpu_s']:.3f} s", f"median of {len(f['pushes'])}")
        row("  context build / translation", f"{f['build_s']:.3f} / {f['gen_s']:.3f} s")
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
            if "endpoint_convergence" in r:
                ratio = r["endpoint_convergence"]["cpu_per_push_s"] / fl["eds_push_cpu_s"]
                note = f"control plane {ratio:.2f} x"
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
        f"meshpilot bench: {c['services']} services x {c['proxies']} proxies, "
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
    ap.add_argument("--proxies", type=int, default=None, help="default 1000 (quick: 100)")
    ap.add_argument("--delta", action="store_true", help="Delta xDS instead of SotW")
    ap.add_argument("--quick", action="store_true", help="100 x 100, fewer changes")
    ap.add_argument("--per-process", type=int, default=250, help="proxy streams per process")
    ap.add_argument("--changes", type=int, default=None, help="endpoint changes (default 20)")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between changes")
    ap.add_argument("--full-pushes", type=int, default=5)
    ap.add_argument("--sync-timeout", type=float, default=300.0)
    ap.add_argument("--no-floor", action="store_true", help="skip the raw floor phase")
    ap.add_argument(
        "--floor-only", action="store_true", help="only the floor, on synthetic responses"
    )
    ap.add_argument(
        "--profile",
        choices=("none", "sync", "changes", "push", "all"),
        default="none",
        help="py-spy the control plane during a phase (pip install py-spy)",
    )
    ap.add_argument("--out", type=Path, default=None, help="results file (default: by mode)")
    ap.add_argument("--deadline", type=float, default=1800.0, help="stop the run after this")
    a = ap.parse_args(argv)
    quick = a.quick
    return Options(
        services=a.services or (100 if quick else 1000),
        proxies=a.proxies or (100 if quick else 1000),
        delta=a.delta,
        per_process=a.per_process,
        changes=a.changes or (10 if quick else 20),
        interval=a.interval,
        full_pushes=a.full_pushes,
        sync_timeout=a.sync_timeout,
        floor=not a.no_floor,
        floor_only=a.floor_only,
        profile=a.profile,
        out=a.out,
        deadline=a.deadline,
    )


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
            log(f"target missed: {t['name']} = {t['value']:.3g} {t['unit']} > {t['target']:g}")
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
