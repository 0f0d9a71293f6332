"""Loading many config files: start-up with 10,000 files, then 10,000 more added live.

    python -m bench.load_files [--files 10000] [--out bench/results/load-files.json]

Writes N small valid files (half Kubernetes Services, half WorkloadEntries, one object
each) into a temp directory and starts `meshpilot serve --config-dir` on it as a child
process on free loopback ports. Phase `startup` polls `/ready` from spawn until it
answers 200 and reports the time to ready and the worst `/ready` latency while loading
(a request that cannot connect yet is not counted). Phase `add` writes N more files into
the watched directory of the running server and polls `/ready` and an ADS CDS request
until `/metrics` counts every object; it reports the time until all are loaded and the
worst latency of each probe. The server is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from bench import mesh, wire

REPO = Path(__file__).resolve().parents[1]
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
_OBJECTS = re.compile(r'^pilot_k8s_cfg_events_current\{type="(\w+)"\} ([0-9.e+]+)$', re.M)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_files(directory: Path, first: int, count: int) -> None:
    """`count` one-object files: svc-i.yaml and we-i.yaml for i in [first, first+count/2)."""
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(first, first + count // 2):
        (directory / f"svc-{i}.yaml").write_text(yaml.safe_dump(mesh.service(i)))
        (directory / f"we-{i}.yaml").write_text(yaml.safe_dump(mesh.workload_entry(i)))


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start the server with its output in `log_path` (sync: before timing starts)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


class Probe:
    """Polls one check in a loop; keeps the worst latency of the answers it got."""

    def __init__(self, name: str, interval: float = 0.05) -> None:
        self.name = name
        self.interval = interval
        self.worst = 0.0
        self.answers = 0
        self.failures = 0

    def record(self, seconds: float) -> None:
        self.answers += 1
        self.worst = max(self.worst, seconds)

    def summary(self) -> dict[str, Any]:
        return {
            "worst_ms": round(self.worst * 1000, 1),
            "answers": self.answers,
            "failures": self.failures,
        }


async def ready_status(session: aiohttp.ClientSession, port: int, probe: Probe) -> int | None:
    start = time.monotonic()
    try:
        async with session.get(f"http://127.0.0.1:{port}/ready") as resp:
            await resp.read()
    except aiohttp.ClientConnectorError:
        return None  # not listening yet: no latency to count
    except (aiohttp.ClientError, TimeoutError):
        probe.failures += 1
        return None
    probe.record(time.monotonic() - start)
    return resp.status


async def poll_ready(session: aiohttp.ClientSession, port: int, probe: Probe) -> None:
    while True:
        await ready_status(session, port, probe)
        await asyncio.sleep(probe.interval)


async def poll_cds(xds_port: int, probe: Probe) -> None:
    """A fresh ADS stream per sample: the time until its first CDS response."""
    node = wire.node_bytes("sidecar~10.100.0.1~probe.bench~bench.svc.cluster.local", {})
    request = discovery_pb2.DiscoveryRequest(type_url=CDS)
    request.node.ParseFromString(node)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{xds_port}", options=[("grpc.max_receive_message_length", 1 << 28)]
    ) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        while True:
            start = time.monotonic()
            call = stub.StreamAggregatedResources()
            try:
                await call.write(request)
                async with asyncio.timeout(60):
                    await call.read()
                probe.record(time.monotonic() - start)
            except (grpc.aio.AioRpcError, TimeoutError):
                probe.failures += 1
            finally:
                call.cancel()
            await asyncio.sleep(probe.interval)


async def object_count(session: aiohttp.ClientSession, port: int) -> int:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    return sum(
        int(float(n)) for kind, n in _OBJECTS.findall(text) if kind in ("Service", "WorkloadEntry")
    )


async def run(files: int) -> dict[str, Any]:
    out: dict[str, Any] = {"files": files}
    with tempfile.TemporaryDirectory(prefix="meshpilot-load-") as tmp:
        conf = Path(tmp) / "conf"
        start = time.monotonic()
        await asyncio.to_thread(write_files, conf / "initial", 0, files)
        out["write_s"] = round(time.monotonic() - start, 2)
        xds_port, mon_port = free_port(), free_port()
        argv = [sys.executable, "-m", "meshpilot", "serve", "--config-dir", str(conf)]
        argv += ["--xds-address", f"127.0.0.1:{xds_port}"]
        argv += ["--monitoring-address", f"127.0.0.1:{mon_port}", "--log-level", "warning"]
        log_path = Path(tmp) / "serve.log"
        proc = spawn(argv, log_path)
        try:
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                out["startup"] = await startup(session, proc, mon_port, start=time.monotonic())
                out["add"] = await add(session, conf / "added", files, mon_port, xds_port)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            errors = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln]
            out["server_log_lines"] = len(errors)
    return out


async def startup(
    session: aiohttp.ClientSession, proc: subprocess.Popen[bytes], port: int, start: float
) -> dict[str, Any]:
    probe = Probe("/ready")
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"meshpilot serve exited with {proc.returncode}")
        if await ready_status(session, port, probe) == 200:
            break
        await asyncio.sleep(probe.interval)
    return {"time_to_ready_s": round(time.monotonic() - start, 2), "ready": probe.summary()}


async def add(
    session: aiohttp.ClientSession, directory: Path, files: int, mon_port: int, xds_port: int
) -> dict[str, Any]:
    before = await object_count(session, mon_port)
    ready, cds = Probe("/ready"), Probe("cds", interval=0.2)
    probes = [
        asyncio.create_task(poll_ready(session, mon_port, ready)),
        asyncio.create_task(poll_cds(xds_port, cds)),
    ]
    await asyncio.sleep(0.5)  # a baseline sample of each before the load starts
    start = time.monotonic()
    try:
        await asyncio.to_thread(write_files, directory, files // 2, files)
        written = time.monotonic() - start
        while await object_count(session, mon_port) < before + files:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        loaded = time.monotonic() - start
    finally:
        for task in probes:
            task.cancel()
        for task in probes:
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return {
        "write_s": round(written, 2),
        "all_loaded_s": round(loaded, 2),
        "ready": ready.summary(),
        "cds": cds.summary(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    result = asyncio.run(run(args.files))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
