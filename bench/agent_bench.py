"""The node agent's costs: start to first certificate served over SDS, memory, renewals.

    python -m bench.agent_bench                 # 10 starts per entry point
    python -m bench.agent_bench --runs 20 --key-type rsa

Starts `meshpilot serve --ca-dir` (a fresh self-signed CA), mints a token, then starts
the agent again and again with the real Envoy, each time measuring:

- spawn -> first `default` secret received by an SDS client on the agent's socket
  (what Envoy waits for; includes the interpreter start and imports);
- the agent's own figure, from its start (after imports) to the first certificate;
- the agent's VmRSS once Envoy runs (steady state, before any renewal);

for `meshpilot agent` and for `python -m meshpilot.agent`, with the agent's memory split
into its own (anonymous) pages and shared library code (file-backed), and PSS. Then one
agent with `--cert-ttl 4s` renews for `--rotate-seconds`: the time of each renewal (key
helper process, CSR over a new TLS connection with the client certificate, SDS push)
and its RSS after.
Results go to bench/results/agent-KEYTYPE.json.

The meshpilot package is byte-compiled first, as `pip install` does: with
PYTHONDONTWRITEBYTECODE=1 in the environment and an editable install, every agent would
otherwise compile its modules from source at each start, which no installed agent does.
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from bench.procs import rss_kb

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
ENTRIES = {
    "meshpilot agent": ["-m", "meshpilot", "agent"],
    "python -m meshpilot.agent": ["-m", "meshpilot.agent"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, timeout: float = 30) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


async def first_default(socket_path: Path, timeout: float = 30) -> None:  # noqa: ASYNC109
    """Subscribe `default` on the agent's socket; return once it is served."""
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(socket_path.exists):  # noqa: ASYNC110
            await asyncio.sleep(0.002)
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            # The socket file appears at bind(), a moment before listen(): wait, not fail.
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            call = stub.StreamSecrets(wait_for_ready=True)
            req = discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, resource_names=["default"])
            await call.write(req)
            async for resp in call:
                for res in resp.resources:
                    secret = secret_pb2.Secret()
                    res.Unpack(secret)
                    if secret.name == "default":
                        call.cancel()
                        return
                req.version_info, req.response_nonce = resp.version_info, resp.nonce
                await call.write(req)


def log_events(path: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with_event = json.loads(line)
            if with_event.get("event") == event:
                out.append(with_event)
    return out


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a child with its output in `log_path` (sync: called before timing starts
    or through to_thread)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def mint_token(ca_dir: Path, path: Path) -> None:
    argv = [sys.executable, "-m", "meshpilot", "token", "create", "--ca-dir", str(ca_dir)]
    argv += ["--namespace", "default", "--service-account", "bench", "--ttl", "24h"]
    token = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)


async def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> int:  # noqa: ASYNC109
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return await asyncio.to_thread(proc.wait, timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return await asyncio.to_thread(proc.wait)


class Bench:
    def __init__(self, key_type: str) -> None:
        self.key_type = key_type
        self.tmp = Path(tempfile.mkdtemp(prefix="mp-bench-agent-"))
        self.port = free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.runs = 0

    async def start_control_plane(self) -> None:
        config = self.tmp / "config"
        config.mkdir()
        argv = [sys.executable, "-m", "meshpilot", "serve", "--config-dir", str(config)]
        argv += ["--ca-dir", str(self.tmp / "ca"), "--secure-xds-address", f"127.0.0.1:{self.port}"]
        argv += ["--xds-address", f"127.0.0.1:{free_port()}"]
        argv += ["--monitoring-address", f"127.0.0.1:{free_port()}", "--log-level", "warning"]
        self.server = await asyncio.to_thread(spawn, argv, self.tmp / "serve.log")
        await wait_port(self.port)
        await asyncio.to_thread(mint_token, self.tmp / "ca", self.tmp / "token")

    def agent_argv(self, entry: list[str], workdir: Path, cert_ttl: str) -> list[str]:
        return [
            sys.executable,
            *entry,
            "--name",
            f"bench-{self.runs}",
            "--namespace",
            "default",
            "--service-account",
            "bench",
            "--token-file",
            str(self.tmp / "token"),
            "--ca-address",
            f"127.0.0.1:{self.port}",
            "--root-cert",
            str(self.tmp / "ca" / "root-cert.pem"),
            "--workdir",
            str(workdir),
            "--cert-ttl",
            cert_ttl,
            "--key-type",
            self.key_type,
            "--admin-port",
            "0",
            "--termination-drain-duration",
            "0s",
            "--log-format",
            "json",
            "--",
            "--log-level",
            "error",
            "--concurrency",
            "1",
        ]

    async def one_start(self, entry: list[str], cert_ttl: str = "1h") -> dict[str, Any]:
        self.runs += 1
        workdir = self.tmp / f"a{self.runs}"
        log_path = self.tmp / f"agent-{self.runs}.log"
        started = time.monotonic()
        proc = await asyncio.to_thread(spawn, self.agent_argv(entry, workdir, cert_ttl), log_path)
        try:
            await first_default(workdir / "sds.sock")
            spawn_to_sds = time.monotonic() - started
            # Steady state: Envoy started and connected to SDS.
            await asyncio.sleep(2.0)
            rss = rss_kb(proc.pid)
            memory = memory_kib(proc.pid)
        finally:
            code = await stop(proc)
        ready = log_events(log_path, "first certificate ready")
        return {
            "spawn_to_first_sds_ms": round(spawn_to_sds * 1000, 1),
            "agent_start_to_cert_ms": ready[0]["took_ms"] if ready else None,
            "rss_kib": rss,
            **memory,
            "exit": code,
        }

    async def rotations(self, seconds: float) -> dict[str, Any]:
        self.runs += 1
        workdir = self.tmp / f"r{self.runs}"
        log_path = self.tmp / f"agent-rotate-{self.runs}.log"
        argv = self.agent_argv(ENTRIES["meshpilot agent"], workdir, "4s")
        proc = await asyncio.to_thread(spawn, argv, log_path)
        try:
            await first_default(workdir / "sds.sock")
            await asyncio.sleep(seconds)
            rss = rss_kb(proc.pid)
            cpu = _cpu_s(proc.pid)
        finally:
            await stop(proc)
        took = [e["took_ms"] for e in log_events(log_path, "certificate rotated")]
        return {
            "cert_ttl_s": 4,
            "seconds": seconds,
            "renewals": len(took),
            "renewal_ms_p50": statistics.median(took) if took else None,
            "renewal_ms_max": max(took) if took else None,
            "rss_kib_after": rss,
            "agent_cpu_s_total": round(cpu, 2),
        }

    async def close(self) -> None:
        if self.server is not None:
            await stop(self.server)
        shutil.rmtree(self.tmp, ignore_errors=True)


def memory_kib(pid: int) -> dict[str, int]:
    """RSS split into anonymous memory (this process's own) and file-backed pages
    (mostly shared libraries' code, shared with every process that maps them), and
    PSS (shared pages divided among the processes sharing them)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile"):
                out[f"rss_{name[3:].lower()}_kib"] = int(value.split()[0])
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                out["pss_kib"] = int(line.split()[1])
    return out


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(samples: list[dict[str, Any]]) -> dict[str, Any]:
    sds = [s["spawn_to_first_sds_ms"] for s in samples]
    own = [s["agent_start_to_cert_ms"] for s in samples if s["agent_start_to_cert_ms"] is not None]
    rss = [s["rss_kib"] for s in samples]

    def mib(key: str) -> float:
        return round(statistics.median(s[key] for s in samples) / 1024, 1)

    return {
        "runs": len(samples),
        "spawn_to_first_sds_ms_p50": round(statistics.median(sds), 1),
        "spawn_to_first_sds_ms_min": min(sds),
        "spawn_to_first_sds_ms_max": max(sds),
        "agent_start_to_cert_ms_p50": round(statistics.median(own), 1) if own else None,
        "rss_mib_p50": round(statistics.median(rss) / 1024, 1),
        "rss_mib_min": round(min(rss) / 1024, 1),
        "rss_mib_max": round(max(rss) / 1024, 1),
        "rss_anon_mib_p50": mib("rss_anon_kib"),
        "rss_file_mib_p50": mib("rss_file_kib"),
        "pss_mib_p50": mib("pss_kib"),
        "exit_codes": sorted({s["exit"] for s in samples}),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    parser.add_argument("--rotate-seconds", type=float, default=20.0)
    args = parser.parse_args()
    compileall.compile_dir(REPO / "meshpilot", quiet=1)
    bench = Bench(args.key_type)
    try:
        await bench.start_control_plane()
        result: dict[str, Any] = {
            "key_type": args.key_type,
            "loadavg_at_start": os.getloadavg()[0],
            "cpus": os.cpu_count(),
            "entry_points": {},
        }
        for label, entry in ENTRIES.items():
            samples = [await bench.one_start(entry) for _ in range(args.runs)]
            result["entry_points"][label] = summary(samples)
            print(label, json.dumps(result["entry_points"][label]), flush=True)
        result["rotation"] = await bench.rotations(args.rotate_seconds)
        print("rotation", json.dumps(result["rotation"]), flush=True)
        result["loadavg_at_end"] = os.getloadavg()[0]
    finally:
        await bench.close()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"agent-{args.key_type}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
