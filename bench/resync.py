"""How fast real Envoys come back after the control plane restarts.

    python -m bench.resync                      # 100 Envoys, 10 s outage
    python -m bench.resync --envoys 50 --down 5
    python -m bench.resync --envoy-default-backoff   # bootstraps without retry_policy

Starts `meshpilot serve` on a small mesh, N real Envoys (`--concurrency 1`, admin on
a kernel-chosen port) with bootstraps from meshpilot.agent.bootstrap, waits until
every proxy has ACKed every type it was sent (/debug/syncz), then SIGKILLs the
control plane by pid, leaves it down for `--down` seconds (a control-plane restart;
meanwhile each Envoy retries with its backoff), starts it again on the same ports and
measures from /ready to all N proxies connected and ACKed again.

`--envoy-default-backoff` removes the ADS `retry_policy` from the bootstraps: Envoy's
own backoff (0.5 s growing to 30 s), for comparison. Results go to
bench/results/resync.json and a line per run to bench/results/resync.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bench.mesh import NAMESPACE, service, workload_entry
from bench.procs import rss_kb
from meshpilot.agent import bootstrap
from meshpilot.procutil import die_with_parent

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
ENVOY = Path(sys.executable).parent / "envoy"
POLL_S = 0.05


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # loopback only
            return int(r.status), r.read()
    except OSError:
        return 0, b""


def all_acked(syncz: list[dict[str, Any]], n: int) -> tuple[int, int]:
    """(connected proxies, proxies whose every sent type is ACKed)."""
    connected: set[str] = set()
    synced: set[str] = set()
    for entry in syncz:
        connected.add(entry["proxy"])
        sent = {k[: -len("_sent")]: v for k, v in entry.items() if k.endswith("_sent")}
        # CDS and LDS at least (EDS/RDS follow them); every sent nonce ACKed.
        if sent.get("cluster") and sent.get("listener"):
            if all(entry.get(f"{t}_acked") == v for t, v in sent.items() if v):
                synced.add(entry["proxy"])
    return len(connected), len(synced)


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.xds_port = free_port()
        self.mon_port = free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.envoys: list[subprocess.Popen[bytes]] = []

    def write_mesh(self) -> Path:
        config = self.work / "config"
        config.mkdir()
        docs = []
        for i in range(self.args.services):
            docs += [service(i), workload_entry(i)]
        (config / "mesh.yaml").write_text(yaml.safe_dump_all(docs))
        return config

    def start_server(self, config: Path) -> None:
        argv = [sys.executable, "-m", "meshpilot", "serve", "--config-dir", str(config)]
        argv += ["--xds-address", f"127.0.0.1:{self.xds_port}"]
        argv += ["--monitoring-address", f"127.0.0.1:{self.mon_port}", "--log-level", "warning"]
        with open(self.work / "server.log", "ab") as log:
            self.server = subprocess.Popen(
                die_with_parent(argv), stdout=log, stderr=subprocess.STDOUT, cwd=REPO
            )

    def start_envoys(self) -> None:
        for i in range(self.args.envoys):
            doc = bootstrap.build_bootstrap(
                name=f"resync-{i}",
                namespace=NAMESPACE,
                ip=f"127.0.{1 + i // 250}.{1 + i % 250}",
                xds_address=f"127.0.0.1:{self.xds_port}",
                admin_port=0,
                delta=self.args.delta,
            )
            if self.args.envoy_default_backoff:
                for svc in doc["dynamic_resources"]["ads_config"]["grpc_services"]:
                    svc["envoy_grpc"].pop("retry_policy", None)
            path = self.work / f"envoy-{i}.json"
            path.write_text(json.dumps(doc))
            argv = [str(ENVOY), "-c", str(path), "--concurrency", "1", "--disable-hot-restart"]
            argv += ["--log-level", "critical"]
            self.envoys.append(
                subprocess.Popen(
                    die_with_parent(argv),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def syncz(self) -> list[dict[str, Any]]:
        status, body = http_get(f"http://127.0.0.1:{self.mon_port}/debug/syncz")
        return json.loads(body) if status == 200 else []

    async def until_synced(self, limit_s: float) -> float:
        start = time.monotonic()
        n = self.args.envoys
        last = (0, 0)
        while time.monotonic() - start < limit_s:
            last = all_acked(await asyncio.to_thread(self.syncz), n)
            if last[1] == n:
                return time.monotonic()
            await asyncio.sleep(POLL_S)
        raise TimeoutError(f"only {last[1]} of {n} proxies ACKed ({last[0]} connected)")

    async def until_ready(self, limit_s: float = 60) -> float:
        start = time.monotonic()
        while time.monotonic() - start < limit_s:
            status, _ = await asyncio.to_thread(
                http_get, f"http://127.0.0.1:{self.mon_port}/ready", 0.5
            )
            if status == 200:
                return time.monotonic()
            await asyncio.sleep(0.02)
        raise TimeoutError("meshpilot serve never became ready")

    async def run(self) -> dict[str, Any]:
        config = self.write_mesh()
        self.start_server(config)
        await self.until_ready()
        t0 = time.monotonic()
        self.start_envoys()
        await self.until_synced(300)
        first_sync = time.monotonic() - t0
        alive = sum(e.poll() is None for e in self.envoys)
        envoy_rss_mb = sum(rss_kb(e.pid) for e in self.envoys if e.poll() is None) / 1024
        assert self.server is not None
        self.server.send_signal(signal.SIGKILL)
        self.server.wait()
        killed = time.monotonic()
        await asyncio.sleep(self.args.down)
        self.start_server(config)
        ready = await self.until_ready()
        synced = await self.until_synced(120)
        return {
            "envoys": self.args.envoys,
            "envoys_alive": alive,
            "services": self.args.services,
            "delta": self.args.delta,
            "backoff": "envoy default (0.5s..30s)"
            if self.args.envoy_default_backoff
            else f"bootstrap retry_back_off {bootstrap.XDS_RETRY_BASE_INTERVAL}.."
            f"{bootstrap.XDS_RETRY_MAX_INTERVAL}",
            "down_s": self.args.down,
            "initial_sync_s": round(first_sync, 2),
            "restart_to_ready_s": round(ready - killed - self.args.down, 2),
            "ready_to_all_acked_s": round(synced - ready, 2),
            "kill_to_all_acked_s": round(synced - killed, 2),
            "envoy_rss_total_mb": round(envoy_rss_mb),
        }

    async def stop(self) -> None:
        procs = [*self.envoys, *([self.server] if self.server else [])]
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                await asyncio.to_thread(p.wait, max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                await asyncio.to_thread(p.wait)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="mp-resync-") as tmp:
        bench = Bench(args, Path(tmp))
        try:
            return await bench.run()
        finally:
            await bench.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envoys", type=int, default=100)
    p.add_argument("--services", type=int, default=20)
    p.add_argument("--down", type=float, default=10.0, help="seconds the control plane is down")
    p.add_argument("--delta", action="store_true")
    p.add_argument("--envoy-default-backoff", action="store_true")
    args = p.parse_args()
    if not ENVOY.is_file():
        sys.exit(f"no Envoy at {ENVOY}: make install")
    result = asyncio.run(main_async(args))
    result["cpus"] = os.cpu_count()
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "resync.json", "a") as f:
        f.write(json.dumps(result) + "\n")
    line = (
        f"{result['envoys']} Envoys ({result['envoys_alive']} alive), {result['backoff']}, "
        f"down {result['down_s']:g}s: restart->/ready {result['restart_to_ready_s']}s, "
        f"/ready->all ACKed {result['ready_to_all_acked_s']}s "
        f"(initial sync {result['initial_sync_s']}s, Envoy RSS {result['envoy_rss_total_mb']} MB, "
        f"{result['cpus']} CPUs)\n"
    )
    with open(RESULTS / "resync.txt", "a") as f:
        f.write(line)


if __name__ == "__main__":
    main()
