"""Server CPU for one endpoint change, from the store change to the bytes of the push.

    python -m bench.endpoint_push [--services 1000] [--endpoints 3] [--changes 50]
                                  [--repeats 5] [--out bench/results/endpoint-push.json]

The mesh: N Kubernetes Services `svc-i` in one namespace, each selecting E
WorkloadEntries. One sidecar proxy (not an endpoint of any service) subscribes to
every EDS cluster and has had its full config generated (CDS, EDS, LDS, RDS), as a
connected Envoy would. Each change moves one WorkloadEntry's address through
`store.apply()`, then runs exactly what the server runs before it writes: the
pusher's `MeshServer._build_context(previous, request)` and `ConfigGenerator.generate`
of EDS for that proxy with the request, and the frame of the response. CPU is
`time.process_time()` around that path, so it is this process's CPU only (no
simulator, no gRPC write: the write of one small frame is the same on every path).

Each repeat is a fresh server; per repeat the median over the changes is taken, and
the report gives the median and spread (min, max) of the repeats' medians, plus the
median split into build and generate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from bench import mesh
from meshpilot.api.parse import parse_object
from meshpilot.config import Config
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.serve import MeshServer, _tune_gc
from meshpilot.settings import Settings
from meshpilot.translators import naming
from meshpilot.xds import typeurls


def _config(doc: dict[str, Any]) -> Config:
    cfg = parse_object(doc, "bench://endpoint-push")
    if not isinstance(cfg, Config):
        raise ValueError(f"benchmark object rejected: {cfg}")
    return cfg


def workload_entry(i: int, k: int, moved: int = 0) -> dict[str, Any]:
    """The k-th WorkloadEntry behind svc-i; `moved` > 0 gives it a new address."""
    doc = mesh.workload_entry(i * 8 + k, moved=moved)
    doc["metadata"]["name"] = f"svc-{i}-{k}"
    doc["spec"]["labels"] = {"app": f"svc-{i}"}
    return doc


def _proxy() -> Proxy:
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": mesh.NAMESPACE})
    node = base_pb2.Node(
        id=f"sidecar~10.100.0.1~client.{mesh.NAMESPACE}~{mesh.NAMESPACE}.svc.cluster.local",
        metadata=meta,
    )
    return Proxy.from_node(node)


def one_repeat(services: int, endpoints: int, changes: int) -> dict[str, Any]:
    server = MeshServer(Settings(monitoring_address="127.0.0.1:0"))
    store = server.store
    store.set_origin("bench://services", [_config(mesh.service(i)) for i in range(services)])
    for i in range(services):
        for k in range(endpoints):
            store.apply(_config(workload_entry(i, k)))
    first = server._build_context(None, PushRequest(full=True))
    proxy = _proxy()
    gen = server.generator
    cds = gen.generate(typeurls.CLUSTER, proxy, first, None, None)
    assert cds is not None
    names = frozenset(
        r.name
        for r in cds.resources
        if naming.parse_cluster_name(r.name) and r.name.startswith("outbound|")
    )
    for type_url in (typeurls.ENDPOINT, typeurls.LISTENER):
        gen.generate(type_url, proxy, first, names if type_url == typeurls.ENDPOINT else None, None)
    _tune_gc()
    ctx: PushContext = first
    build_ms: list[float] = []
    gen_ms: list[float] = []
    total_ms: list[float] = []
    sent = 0
    for n in range(changes):
        i, k = (n * 37) % services, n % endpoints
        cfg = _config(workload_entry(i, k, moved=n + 1))
        t0 = time.process_time()
        keys = store.apply(cfg)
        request = PushRequest.for_changes(keys)
        ctx = server._build_context(ctx, request)
        if ctx.changed_hosts:
            request = PushRequest(
                full=request.full,
                config_keys=request.config_keys,
                eds_hosts=ctx.changed_hosts,
            )
        t1 = time.process_time()
        out = gen.generate(typeurls.ENDPOINT, proxy, ctx, names, request)
        data = (
            b"".join(r.body.SerializeToString() for r in out.resources) if out is not None else b""
        )
        t2 = time.process_time()
        sent += len(data)
        build_ms.append((t1 - t0) * 1000)
        gen_ms.append((t2 - t1) * 1000)
        total_ms.append((t2 - t0) * 1000)
    gc.unfreeze()
    return {
        "total_ms": statistics.median(total_ms),
        "build_ms": statistics.median(build_ms),
        "generate_ms": statistics.median(gen_ms),
        "p90_total_ms": sorted(total_ms)[int(len(total_ms) * 0.9)],
        "bytes_per_change": sent // max(changes, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=3)
    ap.add_argument("--changes", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--label", default="", help="a name for this run in the output")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    runs = [one_repeat(args.services, args.endpoints, args.changes) for _ in range(args.repeats)]

    def spread(field: str) -> dict[str, float]:
        values = [r[field] for r in runs]
        return {
            "median": round(statistics.median(values), 2),
            "min": round(min(values), 2),
            "max": round(max(values), 2),
        }

    result = {
        "label": args.label,
        "services": args.services,
        "workload_entries": args.services * args.endpoints,
        "changes_per_repeat": args.changes,
        "repeats": args.repeats,
        "loadavg": os.getloadavg()[0],
        "cpu_ms_per_change": spread("total_ms"),
        "build_ms": spread("build_ms"),
        "generate_ms": spread("generate_ms"),
        "p90_cpu_ms": spread("p90_total_ms"),
        "bytes_per_change": runs[0]["bytes_per_change"],
    }
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
