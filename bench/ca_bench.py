"""CSR signing throughput of the CA over the secure port, many concurrent gRPC clients.

    python -m bench.ca_bench                       # all scenarios, 10 s each
    python -m bench.ca_bench --scenario ecdsa --seconds 20 --clients 200

`meshpilot serve --ca-dir` runs pinned to one CPU (CPU 0); client processes, pinned
to the other CPUs, each keep `--clients/--procs` channels (separate TLS connections)
busy with CreateCertificate calls authenticated by `meshpilot token create` tokens.
Scenarios:

- ecdsa:   self-signed ECDSA P-256 CA, ECDSA P-256 CSRs (the default setup)
- rsa-csr: ECDSA P-256 CA, RSA 2048 CSRs
- rsa-ca:  Istio's plug-in sample CA (RSA 2048 key), ECDSA P-256 CSRs
- ecdsa-newconn: as ecdsa, but every CSR on a new channel (TLS handshake included),
           as the agent does (it renews rarely and keeps no channel open)
- inline:  `CertificateAuthority.sign` in a loop in this process (no gRPC, no TLS):
           the ceiling the serving overhead is measured against

On a machine with few cores the clients may not be able to saturate the server's
core; `certs_per_server_cpu_s` (certificates per CPU-second of the server process,
all its threads) is then the figure for "per core".

Reported: certificates per second (wall), the server's CPU use over the window
(1.0 = the whole core), certificates per server CPU-second, client latency p50/p99.
Results go to bench/results/ca-SCENARIO.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "istio-samples" / "samples" / "certs"
TARGET_CERTS_PER_S = 500.0
SERVER_NAME = "istiod.istio-system.svc"


# --- client process -------------------------------------------------------------------


def _make_csr(identity: str, rsa_key: bool) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    key = (
        rsa.generate_private_key(65537, 2048)
        if rsa_key
        else ec.generate_private_key(ec.SECP256R1())
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), False
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


async def _client_main(args: argparse.Namespace) -> None:
    import grpc

    from meshpilot.ca.tokens import TokenSigner
    from meshpilot.protos import istio_ca_pb2, istio_ca_pb2_grpc

    signer = TokenSigner.from_ca_dir(Path(args.ca_dir), create=False)
    root = (Path(args.ca_dir) / "root-cert.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root)
    opts = [
        ("grpc.ssl_target_name_override", SERVER_NAME),
        # One TLS connection per simulated agent, as with real agents.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    # A few distinct keys are enough: the CA's work does not depend on key reuse.
    distinct = min(args.clients, 8)
    csrs = []
    for i in range(distinct):
        sa = f"sa-{args.index}-{i}"
        csrs.append(
            (
                signer.create("bench", sa, 3600),
                _make_csr(f"spiffe://cluster.local/ns/bench/sa/{sa}", args.rsa),
            )
        )
    stop_at = 0.0
    measuring = False
    latencies: list[float] = []
    counts = {"ok": 0, "err": 0, "warm_ok": 0}

    async def one_call(stub: Any, req: Any, meta: Any) -> None:
        t0 = time.perf_counter()
        try:
            await stub.CreateCertificate(req, metadata=meta, timeout=30)
        except grpc.aio.AioRpcError:
            counts["err"] += 1
            return
        if measuring:
            counts["ok"] += 1
            latencies.append(time.perf_counter() - t0)
        else:
            counts["warm_ok"] += 1

    async def worker(i: int) -> None:
        token, csr = csrs[i % distinct]
        meta = (("authorization", f"Bearer {token}"),)
        req = istio_ca_pb2.IstioCertificateRequest(csr=csr)
        if args.new_channel:
            while time.monotonic() < stop_at:
                async with grpc.aio.secure_channel(args.target, creds, options=opts) as ch:
                    await one_call(istio_ca_pb2_grpc.IstioCertificateServiceStub(ch), req, meta)
            return
        async with grpc.aio.secure_channel(args.target, creds, options=opts) as ch:
            stub = istio_ca_pb2_grpc.IstioCertificateServiceStub(ch)
            while time.monotonic() < stop_at:
                await one_call(stub, req, meta)

    print(json.dumps({"event": "ready"}), flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    go = json.loads(line)
    stop_at = time.monotonic() + go["warmup"] + go["seconds"]
    tasks = [asyncio.create_task(worker(i)) for i in range(args.clients)]
    await asyncio.sleep(go["warmup"])
    measuring = True
    t0 = time.monotonic()
    await asyncio.sleep(go["seconds"])
    measuring = False
    elapsed = time.monotonic() - t0
    await asyncio.gather(*tasks)
    latencies.sort()
    print(
        json.dumps(
            {
                "event": "done",
                "ok": counts["ok"],
                "errors": counts["err"],
                "elapsed": elapsed,
                "latencies": latencies,
            }
        ),
        flush=True,
    )


# --- runner ---------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pinned(cpus: set[int], argv: list[str]) -> list[str]:
    """`argv` run by taskset on `cpus` (no preexec_fn: nothing runs between fork and exec)."""
    return ["taskset", "-c", ",".join(map(str, sorted(cpus))), *argv]


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(p * len(sorted_values)))]


async def _wait_port(port: int, proc: subprocess.Popen[bytes], limit_s: float = 30.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"meshpilot serve exited with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise RuntimeError("meshpilot serve did not open the secure port")


def run_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start `meshpilot serve` on CPU 0, drive it from client processes, stop it."""
    workdir = Path(tempfile.mkdtemp(prefix="meshpilot-ca-bench-"))
    ca_dir = workdir / "ca"
    if name == "rsa-ca":
        ca_dir.mkdir()
        for f in ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem"):
            shutil.copyfile(SAMPLES / f, ca_dir / f)
    port = _free_port()
    server_argv = [
        sys.executable, "-m", "meshpilot", "serve", "--ca-dir", str(ca_dir),
        "--secure-xds-address", f"127.0.0.1:{port}",
        "--xds-address", "127.0.0.1:0", "--monitoring-address", "127.0.0.1:0",
        "--log-level", args.log_level,
    ]  # fmt: skip
    with open(workdir / "serve.log", "wb") as log:
        server = subprocess.Popen(
            _pinned({0}, server_argv), stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True,
        )  # fmt: skip
        try:
            result = asyncio.run(_drive(name, args, server, port, ca_dir))
        finally:
            server.terminate()
            try:
                server.wait(10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)
    return result


async def _drive(
    name: str, args: argparse.Namespace, server: subprocess.Popen[bytes], port: int, ca_dir: Path
) -> dict[str, Any]:
    client_cpus = set(range(1, os.cpu_count() or 1)) or {0}
    clients: list[asyncio.subprocess.Process] = []
    per_proc = max(1, args.clients // args.procs)
    try:
        await _wait_port(port, server)
        for i in range(args.procs):
            argv = [
                sys.executable, "-m", "bench.ca_bench", "client", "--target", f"127.0.0.1:{port}",
                "--ca-dir", str(ca_dir), "--clients", str(per_proc), "--index", str(i),
            ]  # fmt: skip
            if name == "rsa-csr":
                argv.append("--rsa")
            if name == "ecdsa-newconn":
                argv.append("--new-channel")
            clients.append(
                await asyncio.create_subprocess_exec(
                    *_pinned(client_cpus, argv),
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    cwd=str(REPO),
                    limit=64 * 1024 * 1024,
                )
            )
        for c in clients:
            assert c.stdout is not None
            ready = json.loads(await c.stdout.readline())
            assert ready["event"] == "ready", ready
        go = json.dumps({"warmup": args.warmup, "seconds": args.seconds}).encode() + b"\n"
        for c in clients:
            assert c.stdin is not None
            c.stdin.write(go)
            await c.stdin.drain()
        await asyncio.sleep(args.warmup)
        cpu0, t0 = _cpu_seconds(server.pid), time.monotonic()
        await asyncio.sleep(args.seconds)
        cpu1, t1 = _cpu_seconds(server.pid), time.monotonic()
        done = []
        for c in clients:
            assert c.stdout is not None
            done.append(json.loads(await c.stdout.readline()))
            await c.wait()
    finally:
        for c in clients:
            if c.returncode is None:
                c.kill()
    ok = sum(d["ok"] for d in done)
    latencies = sorted(x for d in done for x in d["latencies"])
    rate = ok / statistics.mean(d["elapsed"] for d in done)
    server_cpu = (cpu1 - cpu0) / (t1 - t0)
    return {
        "scenario": name,
        "clients": per_proc * args.procs,
        "client_processes": args.procs,
        "seconds": args.seconds,
        "log_level": args.log_level,
        "certs": ok,
        "errors": sum(d["errors"] for d in done),
        "certs_per_s": round(rate, 1),
        "server_cpu_cores": round(server_cpu, 3),
        "certs_per_server_cpu_s": round(rate / server_cpu, 1) if server_cpu else None,
        "latency_ms_p50": round(_percentile(latencies, 0.5) * 1000, 2),
        "latency_ms_p99": round(_percentile(latencies, 0.99) * 1000, 2),
        "target_certs_per_s": TARGET_CERTS_PER_S,
        "loadavg_at_end": os.getloadavg()[0],
    }


def run_inline(name: str, args: argparse.Namespace, rsa_csr: bool = False) -> dict[str, Any]:
    from meshpilot.ca.authority import CertificateAuthority
    from meshpilot.ca.identity import SpiffeId

    workdir = Path(tempfile.mkdtemp(prefix="meshpilot-ca-bench-"))
    ca = CertificateAuthority.load_or_create(workdir / "ca")
    ident = SpiffeId("cluster.local", "bench", "sa")
    csr = _make_csr(str(ident), rsa_csr)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min(args.seconds, 5):
        ca.sign(csr, ident)
        n += 1
    elapsed = time.perf_counter() - t0
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "scenario": name,
        "certs": n,
        "certs_per_s": round(n / elapsed, 1),
        "us_per_cert": round(elapsed / n * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--ca-dir", required=True)
    c.add_argument("--clients", type=int, default=50)
    c.add_argument("--index", type=int, default=0)
    c.add_argument("--rsa", action="store_true")
    c.add_argument("--new-channel", action="store_true")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=("inline", "ecdsa", "rsa-csr", "rsa-ca", "ecdsa-newconn"),
        help="repeatable; default all",
    )
    parser.add_argument("--clients", type=int, default=100, help="concurrent channels in all")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--log-level", default="info", help="the server's (default info)")
    args = parser.parse_args()
    if args.mode == "client":
        asyncio.run(_client_main(args))
        return
    RESULTS.mkdir(exist_ok=True)
    results = []
    for name in args.scenario or ["inline", "ecdsa", "rsa-csr", "rsa-ca", "ecdsa-newconn"]:
        if name == "inline":
            res = run_inline(name, args)
        else:
            res = run_scenario(name, args)
        results.append(res)
        suffix = "" if args.log_level == "info" else f"-{args.log_level}"
        (RESULTS / f"ca-{name}{suffix}.json").write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res), flush=True)
    print()
    head = ("scenario", "certs/s", "srv cores", "certs/cpu-s", "p50 ms", "p99 ms")
    print(f"{head[0]:14} {head[1]:>9} {head[2]:>9} {head[3]:>11} {head[4]:>7} {head[5]:>7}")
    for r in results:
        print(
            f"{r['scenario']:14} {r['certs_per_s']:>9} {r.get('server_cpu_cores', '-'):>9} "
            f"{r.get('certs_per_server_cpu_s', '-'):>11} {r.get('latency_ms_p50', '-'):>7} "
            f"{r.get('latency_ms_p99', '-'):>7}"
        )


if __name__ == "__main__":
    main()
