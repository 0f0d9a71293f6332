"""Simulated Envoy proxies: many real ADS streams in one process.

    python -m bench.client --target 127.0.0.1:15010 --first 0 --count 250 [--delta]
        [--services 1000 --namespaces 50 --endpoints 3 --sidecar-per-namespace]
        [--empty-proxies]

Each proxy has its own channel (and TCP connection) and subscribes like Envoy: CDS
(wildcard), then EDS for the EDS clusters it got, then LDS (wildcard) once endpoints
arrived, then RDS for the route names of the HTTP connection managers. Every response
is ACKed. Only the envelope of a response is parsed; the resource names are decoded
once per process and config version and shared by all its streams.

Proxy j's identity (IP, pod, namespace, labels) comes from `bench.mesh.Mesh.proxy`:
by default the sidecar of a WorkloadEntry. When a stream fails (the control plane
restarted) the proxy opens a new one after an Envoy-like jittered exponential
backoff (0.5 s base, 5 s cap) and subscribes from scratch, as Envoy does.

Commands (JSON lines on stdin): go, mark, status, ack_report, resync_status, extra,
capture, quit.
Events (JSON lines on stdout): ready, synced, marked, status, ack_report,
resync_status, extra_synced, captured, stream_error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import statistics
import time
from typing import Any

import grpc

from bench import mesh, wire
from bench.procs import Control

MAX_MESSAGE = 256 * 1024 * 1024
CHANNEL_OPTIONS = (
    # One TCP connection per proxy, as with real Envoys (no shared subchannels).
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    # Reconnect like Envoy's xDS gRPC client (0.5 s base, 5 s cap), not gRPC's default
    # 1 s .. 120 s, which would stretch a control-plane restart into minutes.
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
)
RETRY_BASE_S = 0.5
RETRY_MAX_S = 5.0

CDS_B, EDS_B, LDS_B, RDS_B = (t.encode() for t in wire.TYPES)


def backoff(attempt: int, rng: random.Random) -> float:
    """Envoy's JitteredExponentialBackOffStrategy: uniform in [0, min(base * (2^n - 1),
    max)) for the n-th retry (n >= 1)."""
    ceiling = min(RETRY_BASE_S * ((1 << min(attempt, 16)) - 1), RETRY_MAX_S)
    return rng.uniform(0, ceiling)


class Shared:
    """Per-process caches: decoded names and resource counts, by response content.

    Proxies of one scope receive the very same message, which is decoded once. The
    key is a digest of the whole response, not its type, version and size: with
    Sidecars, scopes of different namespaces get CDS answers of equal length at the
    same version (cluster names of equal length), and a proxy subscribed to EDS for
    another namespace's clusters would then wait for endpoint changes that the
    server rightly never sends it.
    """

    def __init__(self, delta: bool) -> None:
        self.delta = delta
        self.names: dict[bytes, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self.counts: dict[bytes, int] = {}
        self.decoded = 0

    @staticmethod
    def _key(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=16).digest()

    def count(self, data: bytes, env: wire.Envelope) -> int:
        key = self._key(data)
        n = self.counts.get(key)
        if n is None:
            n = self.counts[key] = wire.count(data, 2)
        return n

    def names_of(self, data: bytes, env: wire.Envelope) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(names to subscribe in the dependent type, names removed) for CDS/LDS."""
        key = self._key(data)
        got = self.names.get(key)
        if got is None:
            self.decoded += 1
            if env.type_url == CDS_B:
                names = wire.eds_cluster_names(data, self.delta)
            else:
                names = wire.route_names(data, self.delta)
            removed = wire.strings(data, 6) if self.delta else []
            got = self.names[key] = (tuple(names), tuple(removed))
        return got


class Proxy:
    """One simulated Envoy: one channel, one ADS stream."""

    __slots__ = (
        "ack_log",
        "attempts",
        "cds_ok",
        "channel",
        "connected_at",
        "eds_block",
        "eds_got",
        "eds_names",
        "eds_nonce",
        "eds_version",
        "error",
        "index",
        "last_ack",
        "last_rx",
        "lds_ok",
        "lds_requested",
        "n_resp",
        "namespace",
        "node",
        "rds_block",
        "rds_got",
        "rds_names",
        "rds_nonce",
        "rds_version",
        "reconnects",
        "synced_at",
        "versions",
    )

    def __init__(self, index: int, namespace: str, node: bytes, channel: grpc.aio.Channel) -> None:
        self.index = index
        self.namespace = namespace
        self.node = node
        self.channel = channel
        self.reset()
        self.n_resp = 0
        self.last_rx = 0.0
        self.last_ack = 0.0
        self.attempts = 0
        self.reconnects = 0
        # (type URL, version, time of the ACK) of every EDS and CDS response since a mark.
        self.ack_log: list[tuple[bytes, bytes, float]] | None = None
        # Responses per version_info since the mark: tells when a push reached everyone.
        self.versions: dict[bytes, int] = {}
        self.error = ""

    def reset(self) -> None:
        """Forget the subscription state: a new stream starts from scratch."""
        self.cds_ok = self.lds_ok = self.lds_requested = False
        self.eds_names: Any = ()
        self.eds_block = b""
        self.eds_got = 0
        self.eds_version = self.eds_nonce = b""
        self.rds_names: Any = ()
        self.rds_block = b""
        self.rds_got = 0
        self.rds_version = self.rds_nonce = b""
        self.synced_at = 0.0
        self.connected_at = 0.0

    def synced(self) -> bool:
        return (
            self.cds_ok
            and self.lds_ok
            and self.eds_got >= len(self.eds_names)
            and self.rds_got >= len(self.rds_names)
        )


class Simulator:
    def __init__(self, args: argparse.Namespace, ctl: Control) -> None:
        self.args = args
        self.ctl = ctl
        self.delta: bool = args.delta
        self.shared = Shared(self.delta)
        self.proxies: list[Proxy] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.n_synced = 0
        self.synced_reported = False
        self.capture_phase = "initial"
        self.capture: list[tuple[str, bytes]] = []
        self.errors = 0
        self.t_go = 0.0
        self.t_connected: list[float] = []
        self.rng = random.Random(args.first)
        # Proxies added by `extra` that have not synced yet: index -> start time.
        self.extras: dict[int, float] = {}
        self.f_cds = wire.field(2 if self.delta else 4, wire.CLUSTER.encode())
        self.f_eds = wire.field(2 if self.delta else 4, wire.ENDPOINT.encode())
        self.f_lds = wire.field(2 if self.delta else 4, wire.LISTENER.encode())
        self.f_rds = wire.field(2 if self.delta else 4, wire.ROUTE.encode())

    @property
    def layout(self) -> mesh.Mesh:
        a = self.args
        return mesh.Mesh(
            services=a.services,
            namespaces=a.namespaces,
            endpoints=a.endpoints,
            sidecars=not a.empty_proxies,
            sidecar_per_namespace=a.sidecar_per_namespace,
        )

    def _proxy(self, index: int, who: mesh.ProxyIdentity) -> Proxy:
        channel = grpc.aio.insecure_channel(self.args.target, options=CHANNEL_OPTIONS)
        meta: dict[str, Any] = {"NAMESPACE": who.namespace}
        if who.labels:
            meta["LABELS"] = who.labels
        return Proxy(index, who.namespace, wire.node_bytes(who.node_id(), meta), channel)

    def prepare(self) -> None:
        m = self.layout
        for i in range(self.args.first, self.args.first + self.args.count):
            self.proxies.append(self._proxy(i, m.proxy(i)))

    def go(self) -> None:
        self.t_go = time.monotonic()
        for p in self.proxies:
            self._start(p)

    def _start(self, p: Proxy) -> None:
        run = self.run_delta if self.delta else self.run_sotw
        self.tasks.append(asyncio.create_task(self._guard(p, run)))

    async def _guard(self, p: Proxy, run: Any) -> None:
        """Run the proxy's stream; after a failure reconnect with backoff, like Envoy."""
        while True:
            p.connected_at = time.monotonic()
            try:
                await run(p)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not self.args.reconnect:
                    self.errors += 1
                    p.error = repr(e)[:300]
                    if self.errors == 1:
                        self.ctl.emit("stream_error", proxy=p.index, error=p.error)
                    return
                p.error = repr(e)[:300]
            if p.synced_at and self.args.first <= p.index < self.args.first + self.args.count:
                self.n_synced -= 1
            p.reset()
            p.reconnects += 1
            p.attempts += 1
            await asyncio.sleep(backoff(p.attempts, self.rng))

    def _on_synced(self, p: Proxy, now: float) -> None:
        p.synced_at = now
        p.attempts = 0
        if p.index in self.extras:
            t_start = self.extras.pop(p.index)
            self.ctl.emit("extra_synced", index=p.index, t_start=t_start, t_synced=now)
        n = self.args.count
        if not self.args.first <= p.index < self.args.first + n:
            return  # proxies added by `extra` do not count for the initial sync
        self.n_synced += 1
        if self.n_synced >= n and not self.synced_reported:
            self.synced_reported = True
            times = sorted(x.synced_at for x in self.proxies[:n])
            self.ctl.emit(
                "synced",
                t_go=self.t_go,
                first=times[0],
                p50=times[len(times) // 2],
                last=times[-1],
                decoded=self.shared.decoded,
            )

    def _received(self, p: Proxy, data: bytes, now: float) -> None:
        p.n_resp += 1
        p.last_rx = now
        if p.index == self.args.first and self.args.capture:
            self.capture.append((self.capture_phase, data))

    # --- SotW --------------------------------------------------------------------------

    async def run_sotw(self, p: Proxy) -> None:
        call = p.channel.stream_stream(wire.ADS_SOTW)(wait_for_ready=True)
        shared = self.shared
        mono = time.monotonic
        req = wire.sotw_request
        await call.write(req(self.f_cds, b"", b"", b"", p.node))
        while True:
            data = await call.read()
            if data is grpc.aio.EOF:
                raise EOFError("server closed the stream")
            now = mono()
            self._received(p, data, now)
            env = wire.envelope(data)
            p.versions[env.version] = p.versions.get(env.version, 0) + 1
            t = env.type_url
            if t == EDS_B:
                p.eds_version, p.eds_nonce = env.version, env.nonce
                await call.write(req(self.f_eds, env.version, env.nonce, p.eds_block))
                p.eds_got += shared.count(data, env)
                if p.ack_log is not None:
                    p.ack_log.append((t, env.version, mono()))
                if not p.lds_requested:
                    p.lds_requested = True
                    await call.write(req(self.f_lds, b"", b"", b""))
            elif t == CDS_B:
                names, _ = shared.names_of(data, env)
                if names != p.eds_names:
                    p.eds_names, p.eds_got = names, 0
                    p.eds_block = wire.repeated(3, names)
                    await call.write(req(self.f_eds, p.eds_version, p.eds_nonce, p.eds_block))
                await call.write(req(self.f_cds, env.version, env.nonce, b""))
                p.cds_ok = True
                if p.ack_log is not None:
                    p.ack_log.append((t, env.version, mono()))
            elif t == LDS_B:
                names, _ = shared.names_of(data, env)
                if names != p.rds_names:
                    p.rds_names, p.rds_got = names, 0
                    p.rds_block = wire.repeated(3, names)
                    await call.write(req(self.f_rds, p.rds_version, p.rds_nonce, p.rds_block))
                await call.write(req(self.f_lds, env.version, env.nonce, b""))
                p.lds_ok = True
            elif t == RDS_B:
                p.rds_version, p.rds_nonce = env.version, env.nonce
                await call.write(req(self.f_rds, env.version, env.nonce, p.rds_block))
                p.rds_got += shared.count(data, env)
            else:
                await call.write(req(wire.field(4, t), env.version, env.nonce, b""))
            p.last_ack = mono()
            if not p.synced_at and p.synced():
                self._on_synced(p, p.last_ack)

    # --- Delta -------------------------------------------------------------------------

    async def run_delta(self, p: Proxy) -> None:
        call = p.channel.stream_stream(wire.ADS_DELTA)(wait_for_ready=True)
        shared = self.shared
        mono = time.monotonic
        req = wire.delta_request
        eds: set[str] = set()
        rds: set[str] = set()
        await call.write(req(self.f_cds, node=p.node))
        while True:
            data = await call.read()
            if data is grpc.aio.EOF:
                raise EOFError("server closed the stream")
            now = mono()
            self._received(p, data, now)
            env = wire.envelope(data, delta=True)
            p.versions[env.version] = p.versions.get(env.version, 0) + 1
            t = env.type_url
            if t == EDS_B:
                await call.write(req(self.f_eds, env.nonce))
                p.eds_got += shared.count(data, env)
                if p.ack_log is not None:
                    p.ack_log.append((t, env.version, mono()))
                if not p.lds_requested:
                    p.lds_requested = True
                    await call.write(req(self.f_lds))
            elif t == CDS_B:
                names, removed = shared.names_of(data, env)
                add = [n for n in names if n not in eds]
                drop = [n for n in removed if n in eds]
                if add or drop:
                    eds.update(add)
                    eds.difference_update(drop)
                    p.eds_names = eds
                    sub = wire.repeated(3, add) + wire.repeated(4, drop)
                    await call.write(req(self.f_eds, subscribe=sub))
                await call.write(req(self.f_cds, env.nonce))
                p.cds_ok = True
                if p.ack_log is not None:
                    p.ack_log.append((t, env.version, mono()))
            elif t == LDS_B:
                names, _ = shared.names_of(data, env)
                add = [n for n in names if n not in rds]
                if add:
                    rds.update(add)
                    p.rds_names = rds
                    await call.write(req(self.f_rds, subscribe=wire.repeated(3, add)))
                await call.write(req(self.f_lds, env.nonce))
                p.lds_ok = True
            elif t == RDS_B:
                await call.write(req(self.f_rds, env.nonce))
                p.rds_got += shared.count(data, env)
            else:
                await call.write(req(wire.field(2, t), env.nonce))
            p.last_ack = mono()
            if not p.synced_at and p.synced():
                self._on_synced(p, p.last_ack)

    # --- commands ----------------------------------------------------------------------

    def mark(self, phase: str, ack_log: bool) -> None:
        for p in self.proxies:
            p.n_resp = 0
            p.last_rx = p.last_ack = 0.0
            p.ack_log = [] if ack_log else None
            p.versions = {}
        self.capture_phase = phase
        self.ctl.emit("marked", phase=phase, t=time.monotonic())

    def status(self, version: str = "") -> None:
        ps = self.proxies
        v = version.encode()
        at_version = [p.versions.get(v, 0) for p in ps] if v else [0]
        self.ctl.emit(
            "status",
            min_at_version=min(at_version, default=0),
            max_at_version=max(at_version, default=0),
            streams=len(ps),
            synced=self.n_synced,
            errors=self.errors,
            with_resp=sum(1 for p in ps if p.n_resp),
            min_resp=min((p.n_resp for p in ps), default=0),
            max_resp=max((p.n_resp for p in ps), default=0),
            last_rx=max((p.last_rx for p in ps), default=0.0),
            last_ack=max((p.last_ack for p in ps), default=0.0),
            now=time.monotonic(),
        )

    def ack_report(self, versions: list[str], namespaces: list[str], type_url: str) -> None:
        """Per change i: over this process's proxies that see namespace i's services,
        the latest first ACK of a `type_url` response at version i or later (a later
        one includes change i, coalesced); `expected` counts those proxies."""
        m = self.layout
        index = {v.encode(): i for i, v in enumerate(versions)}
        n = len(versions)
        wanted = type_url.encode()
        worst: list[float | None] = [None] * n
        got, expected = [0] * n, [0] * n
        # Per change, a few proxies that should have ACKed it and did not (to debug).
        missing: list[list[str]] = [[] for _ in range(n)]
        for p in self.proxies:
            sees = [m.sees(p.namespace, ns) for ns in namespaces]
            first: list[float | None] = [None] * n
            for t_url, version, t in p.ack_log or ():
                i = index.get(version) if t_url == wanted else None
                if i is None:
                    continue
                for j in range(i, -1, -1):
                    if first[j] is not None:
                        break
                    first[j] = t
            for j, t in enumerate(first):
                expected[j] += sees[j]
                if t is None and sees[j] and len(missing[j]) < 5:
                    got_versions = [v.decode() for u, v, _ in p.ack_log or () if u == wanted]
                    missing[j].append(f"proxy-{p.index}.{p.namespace} got {got_versions[-4:]}")
                if t is None or not sees[j]:
                    continue
                got[j] += 1
                w = worst[j]
                if w is None or t > w:
                    worst[j] = t
        # Responses of that type carrying exactly each change's version (any proxy).
        exact = [0] * n
        for p in self.proxies:
            for t_url, version, _ in p.ack_log or ():
                i = index.get(version) if t_url == wanted else None
                if i is not None:
                    exact[i] += 1
        self.ctl.emit(
            "ack_report", worst=worst, got=got, expected=expected, missing=missing, exact=exact
        )

    def resync_status(self, since: float) -> None:
        """How many proxies opened a new stream after `since` and are synced on it."""
        ps = self.proxies
        resynced = [p.synced_at for p in ps if p.synced_at and p.connected_at > since]
        self.ctl.emit(
            "resync_status",
            streams=len(ps),
            resynced=len(resynced),
            last=max(resynced, default=0.0),
            reconnects=sum(p.reconnects for p in ps),
            errors=self.errors,
            now=time.monotonic(),
        )

    def extra(self, index: int, proxy: dict[str, Any]) -> None:
        """Connect one more proxy (e.g. the sidecar of a workload in a new namespace)."""
        p = self._proxy(index, mesh.ProxyIdentity(**proxy))
        self.proxies.append(p)
        self.extras[index] = time.monotonic()
        self._start(p)

    def write_capture(self, phase: str, path: str) -> None:
        msgs = [d for ph, d in self.capture if ph == phase]
        wire.write_script(path, msgs)
        per_type: dict[str, dict[str, Any]] = {}
        for d in msgs:
            env = wire.envelope(d, self.delta)
            short = wire.SHORT.get(env.type_url.decode(), env.type_url.decode())
            sizes = wire.resource_sizes(d, self.delta)
            entry = per_type.setdefault(
                short, {"responses": 0, "response_bytes": 0, "resources": 0, "sizes": []}
            )
            entry["responses"] += 1
            entry["response_bytes"] += len(d)
            entry["resources"] += len(sizes)
            entry["sizes"].extend(sizes)
        for entry in per_type.values():
            sizes = entry.pop("sizes")
            entry["resource_bytes_mean"] = round(statistics.fmean(sizes), 1) if sizes else 0
            entry["resource_bytes_max"] = max(sizes, default=0)
        self.ctl.emit(
            "captured",
            phase=phase,
            path=path,
            messages=len(msgs),
            bytes=sum(len(d) for d in msgs),
            per_type=per_type,
        )

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(BaseException):
                await t
        for p in self.proxies:
            with contextlib.suppress(Exception):
                await p.channel.close(grace=None)

    async def handle(self, cmd: dict[str, Any]) -> str | None:
        name = cmd["cmd"]
        if name == "go":
            self.go()
        elif name == "mark":
            self.mark(cmd["phase"], bool(cmd.get("ack_log")))
        elif name == "status":
            self.status(cmd.get("version", ""))
        elif name == "ack_report":
            self.ack_report(cmd["versions"], cmd["namespaces"], cmd["type_url"])
        elif name == "resync_status":
            self.resync_status(float(cmd["since"]))
        elif name == "extra":
            self.extra(int(cmd["index"]), cmd["proxy"])
        elif name == "capture":
            self.write_capture(cmd["phase"], cmd["path"])
        elif name == "quit":
            return "quit"
        else:
            raise ValueError(f"unknown command {name!r}")
        return None


async def main_async(args: argparse.Namespace) -> None:
    ctl = Control()
    sim = Simulator(args, ctl)
    sim.prepare()
    ctl.emit("ready", pid=os.getpid(), streams=len(sim.proxies))
    try:
        await ctl.serve(sim.handle)
    finally:
        await sim.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--target", required=True)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=250)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--namespaces", type=int, default=1)
    ap.add_argument("--endpoints", type=int, default=1)
    ap.add_argument("--sidecar-per-namespace", action="store_true")
    ap.add_argument("--empty-proxies", action="store_true", help="proxies of no workload")
    ap.add_argument("--reconnect", action="store_true", help="reconnect failed streams")
    ap.add_argument("--delta", action="store_true")
    ap.add_argument("--capture", action="store_true", help="keep the first proxy's responses")
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
