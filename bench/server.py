"""The control plane under test, in its own process, driven over stdin/stdout.

    python -m bench.server --services 1000 --namespaces 50 --endpoints 3 [--port 0]

Builds `MeshServer` exactly as `meshpilot serve` does, loads the benchmark mesh
(`bench.mesh`) into its store before `start()` (Services, the gateway and Sidecars as
one origin, each WorkloadEntry and the DestinationRule as its own object, like an
informer's initial list), then serves ADS on 127.0.0.1. A restart with the same
arguments (and `--port`) serves the same config.

Commands (JSON lines on stdin):
  stats                         -> stats {rss_kb, hwm_kb, cpu, threads, build_s, ...}
  changes {n, interval, kind}   -> change {i, t, wall, version, namespace} per change,
                                   then changes_done. kind "endpoint" moves one
                                   WorkloadEntry's address, kind "dr" changes the
                                   gateway DestinationRule's connection pool (every
                                   proxy has that cluster); both with `store.apply()`.
  add_service {index}           -> pushed {t, version}: a new Service + WorkloadEntry
                                   in istio-system (one origin, one commit): a full
                                   push to everyone.
  add_namespace {index}         -> pushed {t, version, proxy}: a new namespace with a
                                   Service, its WorkloadEntry (and its Sidecar); `proxy`
                                   is the identity of that workload's sidecar.
  quit
All times are `time.monotonic()` (CLOCK_MONOTONIC, comparable across processes).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from bench import mesh
from bench.procs import Control, cpu_seconds, peak_rss_kb, rss_kb, thread_cpu
from meshpilot import logs
from meshpilot.api.parse import parse_object
from meshpilot.config import Config
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings
from meshpilot.translators import clusters, endpoints, listeners, routes
from meshpilot.xds import generator

T = TypeVar("T")


def _config(doc: dict[str, Any], origin: str) -> Config:
    cfg = parse_object(doc, origin)
    if not isinstance(cfg, Config):
        raise ValueError(f"benchmark object rejected: {cfg}")
    return cfg


class InstrumentedServer(MeshServer):
    """MeshServer with timers around context builds and around the translators.

    Translation time is the time spent in the translator entry points and in
    serializing their output (`generator._resource`): only cache misses reach them,
    so the timers cost nothing on the shared-output path. The pipeline is unchanged.
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.build_s = 0.0
        self.builds = 0
        self.gen_s = 0.0
        self.gen_calls = 0
        for module, name in (
            (clusters, "build_clusters"),
            (listeners, "build_listeners"),
            (routes, "build_route_configs"),
            (endpoints, "build_load_assignment"),
            (generator, "_resource"),
        ):
            setattr(module, name, self._timed(getattr(module, name)))

    def _timed(self, fn: Callable[..., T]) -> Callable[..., T]:
        if getattr(fn, "_bench_timed", False):
            return fn

        def timed(*args: Any, **kwargs: Any) -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.gen_s += time.perf_counter() - t0
                self.gen_calls += 1

        timed._bench_timed = True  # type: ignore[attr-defined]
        return timed

    def _build_context(self, previous: PushContext | None, request: PushRequest) -> PushContext:
        t0 = time.perf_counter()
        try:
            return super()._build_context(previous, request)
        finally:
            self.build_s += time.perf_counter() - t0
            self.builds += 1


class Bench:
    def __init__(self, args: argparse.Namespace, ctl: Control) -> None:
        self.args = args
        self.ctl = ctl
        settings = Settings(
            xds_address=f"127.0.0.1:{args.port}",
            monitoring_address="127.0.0.1:0",
            debounce_after=args.debounce,
        )
        self.server = InstrumentedServer(settings)
        self._tasks: set[asyncio.Task[None]] = set()
        self.moves = 0
        self.revisions = 0

    @property
    def mesh(self) -> mesh.Mesh:
        a = self.args
        return mesh.Mesh(
            services=a.services,
            namespaces=a.namespaces,
            endpoints=a.endpoints,
            sidecar_per_namespace=a.sidecar_per_namespace,
        )

    def load(self) -> dict[str, float]:
        m, n = self.mesh, self.args.services
        t0 = time.perf_counter()
        services = [_config(m.service(i), "bench://services") for i in range(n)]
        shared = [_config(d, "bench://services") for d in m.gateway() + m.sidecars_docs()]
        entries = [
            _config(m.workload_entry(i, e), "bench://workloads")
            for e in range(m.endpoints)
            for i in range(n)
        ]
        rule = _config(mesh.destination_rule_doc(0), "bench://rules")
        t1 = time.perf_counter()
        store = self.server.store
        store.set_origin("bench://services", services + shared)
        for cfg in entries:
            store.apply(cfg)
        store.apply(rule)
        t2 = time.perf_counter()
        return {"parse_s": round(t1 - t0, 3), "store_s": round(t2 - t1, 3)}

    def stats(self) -> dict[str, Any]:
        pid = os.getpid()
        s = self.server
        ctx = s.pusher.current
        return {
            "rss_kb": rss_kb(pid),
            "hwm_kb": peak_rss_kb(pid),
            "cpu": cpu_seconds(pid),
            "threads": thread_cpu(pid),
            "connections": len(s.discovery.connections),
            "build_s": s.build_s,
            "builds": s.builds,
            "gen_s": s.gen_s,
            "gen_calls": s.gen_calls,
            "pushes": s.pusher.pushes,
            "version": ctx.version if ctx else "",
        }

    async def _next_version(self, previous: str, within: float = 120.0) -> str:
        """Wait until the pusher has built (and fanned out) a context after `previous`."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            ctx = self.server.pusher.current
            if ctx is not None and ctx.version != previous:
                return ctx.version
            await asyncio.sleep(0.002)
        raise TimeoutError("no push context was built after the change")

    def _current_version(self) -> str:
        ctx = self.server.pusher.current
        return ctx.version if ctx else ""

    async def changes(self, n: int, interval: float, kind: str) -> None:
        """n changes through the store, one every `interval` seconds: WorkloadEntry
        moves (kind "endpoint") or DestinationRule revisions (kind "dr")."""
        m = self.mesh
        start = time.monotonic()
        for i in range(n):
            await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
            if kind == "dr":
                self.revisions += 1
                cfg = _config(mesh.destination_rule_doc(self.revisions), "bench://changes")
                namespace, what = mesh.SHARED_NAMESPACE, f"revision {self.revisions}"
            else:
                service, endpoint = m.moved_entry(i)
                self.moves += 1
                address = m.moved_address(self.moves, service)
                cfg = _config(m.workload_entry(service, endpoint, address), "bench://changes")
                namespace, what = m.namespace_of(service), f"svc-{service}-{endpoint}"
            previous = self._current_version()
            t, wall = time.monotonic(), time.time()
            self.server.store.apply(cfg)
            version = await self._next_version(previous)
            self.ctl.emit(
                "change",
                i=i,
                t=t,
                wall=wall,
                version=version,
                namespace=namespace,
                what=what,
                built_after=round(time.monotonic() - t, 4),
            )
        self.ctl.emit("changes_done", n=n)

    async def _commit(self, origin: str, docs: list[dict[str, Any]], **extra: Any) -> None:
        cfgs = [_config(d, origin) for d in docs]
        previous = self._current_version()
        build_before = self.server.build_s
        t = time.monotonic()
        self.server.store.set_origin(origin, cfgs)
        version = await self._next_version(previous)
        self.ctl.emit(
            "pushed",
            t=t,
            version=version,
            built_after=round(time.monotonic() - t, 4),
            build_s=round(self.server.build_s - build_before, 4),
            **extra,
        )

    async def add_service(self, index: int) -> None:
        await self._commit(f"bench://extra-{index}", self.mesh.extra_service(index))

    async def add_namespace(self, index: int) -> None:
        docs, proxy = self.mesh.fresh_namespace(index)
        await self._commit(f"bench://fresh-{index}", docs, proxy=dataclasses.asdict(proxy))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                self.ctl.emit("error", error=repr(t.exception()))

        task.add_done_callback(done)

    def handle(self, cmd: dict[str, Any]) -> str | None:
        name = cmd["cmd"]
        if name == "stats":
            self.ctl.emit("stats", **self.stats())
        elif name == "changes":
            kind = str(cmd.get("kind", "endpoint"))
            self._spawn(self.changes(int(cmd["n"]), float(cmd["interval"]), kind))
        elif name == "add_service":
            self._spawn(self.add_service(int(cmd["index"])))
        elif name == "add_namespace":
            self._spawn(self.add_namespace(int(cmd["index"])))
        elif name == "quit":
            return "quit"
        else:
            raise ValueError(f"unknown command {name!r}")
        return None


async def main_async(args: argparse.Namespace) -> None:
    ctl = Control()
    logs.configure("console", args.log_level)
    bench = Bench(args, ctl)
    loaded = bench.load()
    t0 = time.perf_counter()
    await bench.server.start()
    start_s = time.perf_counter() - t0
    try:
        ctl.emit(
            "ready",
            pid=os.getpid(),
            port=bench.server.xds_port,
            start_s=round(start_s, 3),
            objects=len(bench.server.store.snapshot()),
            errors=len(bench.server.store.errors()),
            **loaded,
            **bench.stats(),
        )
        await ctl.serve(bench.handle)
    finally:
        for task in list(bench._tasks):
            task.cancel()
        await asyncio.wait_for(bench.server.stop(), 10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--namespaces", type=int, default=1)
    ap.add_argument("--endpoints", type=int, default=1, help="WorkloadEntries per Service")
    ap.add_argument("--sidecar-per-namespace", action="store_true")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--debounce", type=float, default=0.1)
    ap.add_argument("--log-level", default="warning")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
