"""Routing benchmark: one scope's full config with routing rules on every service.

1000 services, each with a DestinationRule (3 subsets, outlier detection) and a
VirtualService (header match + 80/20 weighted split). Measures, on one core, the CPU
time to generate CDS, EDS, LDS and RDS for one sidecar scope, checks that a second
proxy of the same scope reuses the output (no growth with proxies), and reports the
bytes per cluster, ClusterLoadAssignment and route configuration next to Istio's
published figures.

    python -m bench.scope_gen [--services 1000] [--endpoints 3]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.xds import typeurls
from meshpilot.xds.generator import ConfigGenerator

RESULTS = Path(__file__).parent / "results"
ISTIO_BYTES = {"cluster": 1000, "cla": 300, "route_config": 8000}


def mesh_yaml(services: int, endpoints: int) -> str:
    docs = []
    for i in range(services):
        name = f"svc{i}"
        docs.append(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n"
            f"spec: {{selector: {{app: {name}}}, ports: [{{name: http, port: 9080}}]}}\n"
        )
        for j in range(endpoints):
            docs.append(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
                f"metadata: {{name: {name}-{j}, namespace: bench}}\n"
                f"spec: {{address: 10.{i // 250}.{i % 250}.{j + 1}, "
                f"labels: {{app: {name}, version: v{j % 3 + 1}}}}}\n"
            )
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
            f"metadata: {{name: {name}, namespace: bench}}\n"
            f"spec:\n  host: {name}\n  trafficPolicy:\n"
            "    outlierDetection: {consecutive5xxErrors: 5, interval: 10s}\n"
            "  subsets:\n"
            + "".join(f"  - {{name: v{k}, labels: {{version: v{k}}}}}\n" for k in (1, 2, 3))
        )
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
            f"metadata: {{name: {name}, namespace: bench}}\n"
            f"spec:\n  hosts: [{name}]\n  http:\n"
            "  - match: [{headers: {end-user: {exact: jason}}}]\n"
            f"    route: [{{destination: {{host: {name}, subset: v2}}}}]\n"
            f"  - route:\n    - {{destination: {{host: {name}, subset: v1}}, weight: 80}}\n"
            f"    - {{destination: {{host: {name}, subset: v3}}, weight: 20}}\n"
        )
    return "---\n".join(docs)


def proxy(n: int) -> Proxy:
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": "bench", "LABELS": {"app": f"client{n}"}})
    node_id = f"sidecar~10.200.0.{n}~client{n}.bench~bench.svc.cluster.local"
    return Proxy.from_node(base_pb2.Node(id=node_id, metadata=meta))


def generate_all(gen: ConfigGenerator, push: PushContext, p: Proxy) -> dict[str, list]:
    out: dict[str, list] = {}
    cds = gen.generate(typeurls.CLUSTER, p, push, None, None)
    assert cds is not None
    out["cds"] = list(cds.resources)
    eds_names = frozenset(r.name for r in cds.resources if r.name.startswith("outbound|"))
    eds = gen.generate(typeurls.ENDPOINT, p, push, eds_names, None)
    lds = gen.generate(typeurls.LISTENER, p, push, None, None)
    rds = gen.generate(typeurls.ROUTE, p, push, None, None)
    assert eds is not None and lds is not None and rds is not None
    out["eds"], out["lds"], out["rds"] = (
        list(eds.resources),
        list(lds.resources),
        list(rds.resources),
    )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scope_gen")
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=3)
    args = parser.parse_args()

    result = parse_text(mesh_yaml(args.services, args.endpoints), "bench.yaml")
    assert not result.errors, result.errors[:3]
    store = ConfigStore()
    store.set_origin("bench.yaml", result.configs)
    t = time.process_time()
    push = PushContext.build(store.snapshot(), MeshConfig())
    build_cpu = time.process_time() - t

    gen = ConfigGenerator()
    t = time.process_time()
    first = generate_all(gen, push, proxy(1))
    first_cpu = time.process_time() - t
    t = time.process_time()
    second = generate_all(gen, push, proxy(2))
    second_cpu = time.process_time() - t
    shared = all(a is b for kind in first for a, b in zip(first[kind], second[kind], strict=True))

    def mean(resources: list) -> float:
        return sum(len(r.body.value) for r in resources) / max(len(resources), 1)

    outbound = [r for r in first["cds"] if r.name.startswith("outbound|")]
    figures = {
        "services": args.services,
        "endpoints_per_service": args.endpoints,
        "push_context_build_cpu_s": round(build_cpu, 3),
        "scope_generation_cpu_s": round(first_cpu, 3),
        "second_proxy_same_scope_cpu_s": round(second_cpu, 4),
        "second_proxy_shares_every_resource": shared,
        "resources": {k: len(v) for k, v in first.items()},
        "bytes_per_cluster": round(mean(outbound)),
        "bytes_per_cla": round(mean(first["eds"])),
        "bytes_per_route_config": round(mean(first["rds"])),
        "bytes_per_virtual_host": round(mean(first["rds"]) / args.services),
        "istio_published_bytes": ISTIO_BYTES,
        "target_scope_generation_s": 1.0,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"scope-gen-{args.services}.json"
    out.write_text(json.dumps(figures, indent=2) + "\n")
    ok = "PASS" if first_cpu <= 1.0 else "FAIL"
    print(f"{'metric':44} {'value':>12}  target / Istio")
    print(f"{'PushContext build (CPU s)':44} {build_cpu:12.3f}")
    print(f"{'one scope, CDS+EDS+LDS+RDS (CPU s)':44} {first_cpu:12.3f}  <= 1.0 {ok}")
    print(f"{'second proxy, same scope (CPU s)':44} {second_cpu:12.4f}  shared: {shared}")
    print(f"{'bytes per cluster':44} {figures['bytes_per_cluster']:12}  ~1000")
    print(f"{'bytes per ClusterLoadAssignment':44} {figures['bytes_per_cla']:12}  ~300")
    print(
        f"{'bytes per route config (1 per port)':44} {figures['bytes_per_route_config']:12}"
        f"  ~8000 per service ({figures['bytes_per_virtual_host']} per virtual host here)"
    )
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
