"""Start-up time: `meshpilot serve` from exec to the first 200 of /ready.

    python -m bench.startup [--services 1000] [--endpoints 3] [--repeats 5]
                            [--layout per-service|per-object] [--out FILE]

Writes the mesh to a temporary directory (N Kubernetes Services `svc-i`, each
selecting E WorkloadEntries; `per-service`: one file per service with its entries,
`per-object`: one file per object), then starts `python -m meshpilot serve
--config-dir DIR` on loopback ports and polls /ready every 5 ms. Wall time is from
just before `exec` to the first 200; the server's CPU at that moment comes from
/proc/PID/stat. Each repeat is a fresh process (the OS page cache is warm after the
first). The server is stopped by its pid. `--baseline DIR` alternates with the
package in DIR (e.g. `git archive OLD meshpilot | tar -x -C DIR`) for before/after
figures under the same load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import mesh
from bench.procs import cpu_seconds


def write_mesh(root: Path, services: int, endpoints: int, layout: str) -> int:
    """The benchmark mesh as YAML files under `root`; the number of files."""
    files = 0
    for i in range(services):
        docs: list[dict[str, Any]] = [mesh.service(i)]
        for k in range(endpoints):
            we = mesh.workload_entry(i * endpoints + k)
            we["metadata"]["name"] = f"svc-{i}-{k}"
            we["spec"]["labels"] = {"app": f"svc-{i}"}
            docs.append(we)
        if layout == "per-service":
            (root / f"svc-{i}.yaml").write_text(yaml.safe_dump_all(docs))
            files += 1
        else:
            for doc in docs:
                name = f"{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"
                (root / name).write_text(yaml.safe_dump(doc))
                files += 1
    return files


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ready(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def one_start(config_dir: Path, timeout: float, tree: Path | None = None) -> dict[str, float]:
    mon = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "meshpilot",
        "serve",
        "--config-dir",
        str(config_dir),
        "--xds-address",
        "127.0.0.1:0",
        "--monitoring-address",
        f"127.0.0.1:{mon}",
        "--log-level",
        "warning",
    ]
    t0 = time.monotonic()
    # `-m meshpilot` imports the package from the working directory first: a baseline
    # tree (an older checkout) runs its own code with this venv.
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=tree)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"meshpilot serve exited with {proc.returncode}")
            if _ready(mon):
                wall = time.monotonic() - t0
                break
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"/ready not 200 within {timeout}s")
            time.sleep(0.005)
        cpu = cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return {"wall_s": wall, "cpu_s": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layout", choices=("per-service", "per-object"), default="per-service")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="also start the meshpilot package in this directory (an older checkout), "
        "alternating with this one, so both see the same machine load",
    )
    ap.add_argument("--label", default="", help="a name for this run in the output")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshpilot-startup-") as tmp:
        files = write_mesh(Path(tmp), args.services, args.endpoints, args.layout)
        runs: list[dict[str, float]] = []
        base: list[dict[str, float]] = []
        for _ in range(args.repeats):
            if args.baseline is not None:
                base.append(one_start(Path(tmp), args.timeout, args.baseline))
            runs.append(one_start(Path(tmp), args.timeout))

    def spread(field: str, of: list[dict[str, float]] | None = None) -> dict[str, float]:
        values = [r[field] for r in (runs if of is None else of)]
        return {
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3),
            "max": round(max(values), 3),
        }

    result: dict[str, Any] = {
        "label": args.label,
        "services": args.services,
        "workload_entries": args.services * args.endpoints,
        "layout": args.layout,
        "files": files,
        "repeats": args.repeats,
        "loadavg": os.getloadavg()[0],
        "exec_to_ready_s": spread("wall_s"),
        "server_cpu_at_ready_s": spread("cpu_s"),
    }
    if base:
        result["baseline"] = {
            "tree": str(args.baseline),
            "exec_to_ready_s": spread("wall_s", base),
            "server_cpu_at_ready_s": spread("cpu_s", base),
        }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
