"""meshpilot as one side of the peer benchmark: `meshpilot serve` on a config directory,
queried over real gRPC ADS (SotW) by a client that subscribes like Envoy.

The server is started exactly as a user would (`meshpilot serve --config-dir DIR`),
with one YAML file per service (the Service and its WorkloadEntries); an endpoint
change is an atomic rewrite of one such file, picked up by the file watcher.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import yaml

from bench import wire
from bench.peer import workload
from bench.peer.workload import Mesh
from meshpilot.xds.wire import field as pb_field

MAX_MESSAGE = 256 * 1024 * 1024
CHANNEL_OPTIONS = (
    # One TCP connection per proxy, as with real Envoys.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
)
CDS_B, EDS_B, LDS_B, RDS_B = (t.encode() for t in wire.TYPES)
F_CDS, F_EDS, F_LDS, F_RDS = (pb_field(4, t) for t in (CDS_B, EDS_B, LDS_B, RDS_B))


def service_file(config_dir: Path, svc: workload.Service) -> Path:
    return config_dir / f"{svc.name}.yaml"


def write_service(config_dir: Path, svc: workload.Service) -> None:
    """Atomically (rename) write one service's file, so the watcher never reads half."""
    path = service_file(config_dir, svc)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(workload.k8s_objects(svc), sort_keys=False))
    os.replace(tmp, path)


def write_config(config_dir: Path, mesh: Mesh) -> None:
    config_dir.mkdir(parents=True, exist_ok=True)
    for svc in mesh.services:
        write_service(config_dir, svc)


def serve_args(config_dir: Path, xds_port: int, monitoring_port: int) -> list[str]:
    return [
        "-m",
        "meshpilot",
        "serve",
        "--config-dir",
        str(config_dir),
        "--xds-address",
        f"127.0.0.1:{xds_port}",
        "--monitoring-address",
        f"127.0.0.1:{monitoring_port}",
        "--log-level",
        "warning",
    ]


def node_bytes(ip: str, name: str, namespace: str) -> bytes:
    return wire.node_bytes(workload.node_id(ip, name, namespace), {"NAMESPACE": namespace})


@dataclass
class AdsProxy:
    """One proxy on one ADS stream: CDS (wildcard), EDS for the EDS clusters, LDS,
    RDS for the HCMs' route names; every response ACKed as Envoy does."""

    target: str
    node: bytes
    eds_names: tuple[str, ...] = ()
    rds_names: tuple[str, ...] = ()
    sizes: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    eds_version: bytes = b""
    _eds_versions: asyncio.Queue[bytes] = field(default_factory=asyncio.Queue)
    _synced: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task[None] | None = None
    _channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
        self._task = asyncio.create_task(self._run(self._channel))

    async def synced(self, within: float) -> None:
        assert self._task is not None
        waiter = asyncio.create_task(self._synced.wait())
        done, _ = await asyncio.wait(
            {waiter, self._task}, timeout=within, return_when="FIRST_COMPLETED"
        )
        if waiter not in done:
            waiter.cancel()
            if self._task in done:
                self._task.result()  # raises the stream's error
            raise TimeoutError(f"meshpilot: proxy not synced within {within}s")

    async def next_eds(self, within: float) -> bytes:
        """The version of the next EDS response."""
        return await asyncio.wait_for(self._eds_versions.get(), within)

    def drain(self) -> None:
        """Forget the EDS responses seen so far."""
        while not self._eds_versions.empty():
            self._eds_versions.get_nowait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    def _done(self) -> bool:
        got = self.counts
        return (
            "lds" in got
            and "cds" in got
            and got.get("eds", 0) >= len(self.eds_names)
            and got.get("rds", 0) >= len(self.rds_names)
        )

    async def _run(self, channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(wire.ADS_SOTW)(wait_for_ready=True)
        req = wire.sotw_request
        eds_block = rds_block = b""
        rds_version = rds_nonce = eds_nonce = b""
        lds_requested = False
        await call.write(req(F_CDS, b"", b"", b"", self.node))
        while True:
            data = await call.read()
            if data is grpc.aio.EOF:
                raise EOFError("meshpilot closed the stream")
            env = wire.envelope(data)
            t = env.type_url
            if t == EDS_B:
                self.eds_version, eds_nonce = env.version, env.nonce
                await call.write(req(F_EDS, env.version, env.nonce, eds_block))
                self._record("eds", data)
                self._eds_versions.put_nowait(env.version)
                if not lds_requested:
                    lds_requested = True
                    await call.write(req(F_LDS, b"", b"", b""))
            elif t == CDS_B:
                names = tuple(wire.eds_cluster_names(data))
                if names != self.eds_names:
                    self.eds_names = names
                    eds_block = wire.repeated(3, names)
                    await call.write(req(F_EDS, self.eds_version, eds_nonce, eds_block))
                await call.write(req(F_CDS, env.version, env.nonce, b""))
                self._record("cds", data)
            elif t == LDS_B:
                names = tuple(wire.route_names(data))
                if names != self.rds_names:
                    self.rds_names = names
                    rds_block = wire.repeated(3, names)
                    await call.write(req(F_RDS, rds_version, rds_nonce, rds_block))
                await call.write(req(F_LDS, env.version, env.nonce, b""))
                self._record("lds", data)
            elif t == RDS_B:
                rds_version, rds_nonce = env.version, env.nonce
                await call.write(req(F_RDS, env.version, env.nonce, rds_block))
                self._record("rds", data)
            else:
                await call.write(req(pb_field(4, t), env.version, env.nonce, b""))
            if not self._synced.is_set() and self._done():
                self._synced.set()

    def _record(self, short: str, data: bytes) -> None:
        self.sizes[short] = len(data)
        self.counts[short] = wire.count(data, 2)


async def full_config(target: str, node: bytes, within: float) -> AdsProxy:
    """Connect one proxy, wait until it has CDS+EDS+LDS+RDS, disconnect."""
    proxy = AdsProxy(target, node)
    await proxy.start()
    try:
        await proxy.synced(within)
    finally:
        await proxy.close()
    return proxy


async def wait_version_change(proxy: AdsProxy, old: bytes, within: float) -> float:
    """Wait for an EDS response newer than `old`; returns when it arrived (monotonic)."""
    deadline = time.monotonic() + within
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("meshpilot: no EDS push after the endpoint change")
        version = await proxy.next_eds(left)
        if version != old:
            return time.monotonic()
