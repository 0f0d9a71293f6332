"""Per-resource cache benchmark: full configs of real sidecars, in process.

1,000 services in namespace `bench`, each with a DestinationRule (3 subsets, outlier
detection) and a VirtualService (header match + weighted split), 3 endpoints each;
`--namespaces` namespaces with a service `app` whose WorkloadEntries are the simulated
sidecars (so each has its own service instance and inbound listener, as real ones).

Measures the generator's CPU time (time.process_time, one core; the garbage collector
tuned as `meshpilot serve` does) for the full config (CDS, EDS, LDS, RDS) of:

* the first sidecar (everything cold),
* a sidecar in a namespace not seen yet,
* another workload's sidecar in a namespace already seen,
* a proxy of a scope already built (no service instances, same namespace),
* every sidecar already connected after one DestinationRule change, and after one
  VirtualService change (per proxy; the new push context's build is not counted),

and the RSS growth per namespace after one sidecar in each namespace. Each figure is
the median of `--repeat` samples with the spread (min, max). Serialization for the
wire (framing, sending) is not included: only what the generator does.

    python -m bench.resource_cache [--services 1000] [--namespaces 50] [--label after]

Run with `PYTHONPATH=<other checkout>` to measure another version of the generator
(the script uses only ConfigGenerator.generate).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from envoy.config.core.v3 import base_pb2
from google.protobuf import struct_pb2

import meshpilot
from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.serve import tune_gc
from meshpilot.xds import typeurls
from meshpilot.xds.generator import ConfigGenerator

RESULTS = Path(__file__).parent / "results"
WORKLOADS = 8


def service_docs(i: int, endpoints: int, dr_interval: str = "10s", weight: int = 80) -> str:
    name = f"svc{i}"
    docs = [
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n"
        f"spec: {{selector: {{app: {name}}}, ports: [{{name: http, port: 9080}}]}}\n",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: {name}, namespace: bench}}\n"
        f"spec:\n  host: {name}\n  trafficPolicy:\n"
        f"    outlierDetection: {{consecutive5xxErrors: 5, interval: {dr_interval}}}\n"
        "  subsets:\n"
        + "".join(f"  - {{name: v{k}, labels: {{version: v{k}}}}}\n" for k in (1, 2, 3)),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {name}, namespace: bench}}\n"
        f"spec:\n  hosts: [{name}]\n  http:\n"
        "  - match: [{headers: {end-user: {exact: jason}}}]\n"
        f"    route: [{{destination: {{host: {name}, subset: v2}}}}]\n"
        f"  - route:\n    - {{destination: {{host: {name}, subset: v1}}, weight: {weight}}}\n"
        f"    - {{destination: {{host: {name}, subset: v3}}, weight: {100 - weight}}}\n",
    ]
    for j in range(endpoints):
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
            f"metadata: {{name: {name}-{j}, namespace: bench}}\n"
            f"spec: {{address: 10.{i // 250}.{i % 250}.{j + 1}, "
            f"labels: {{app: {name}, version: v{j % 3 + 1}}}}}\n"
        )
    return "---\n".join(docs)


def namespace_docs(n: int) -> str:
    ns = f"ns{n}"
    docs = [
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: app, namespace: {ns}}}\n"
        "spec: {selector: {app: app}, ports: [{name: http, port: 8080}]}\n"
    ]
    for j in range(WORKLOADS):
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
            f"metadata: {{name: app-{j}, namespace: {ns}}}\n"
            f"spec: {{address: {sidecar_ip(n, j)}, labels: {{app: app}}}}\n"
        )
    return "---\n".join(docs)


def sidecar_ip(n: int, j: int) -> str:
    return f"10.200.{n}.{j + 1}"


def proxy(namespace: str, ip: str, name: str, app: str) -> Proxy:
    meta = struct_pb2.Struct()
    meta.update({"NAMESPACE": namespace, "LABELS": {"app": app}})
    node_id = f"sidecar~{ip}~{name}.{namespace}~{namespace}.svc.cluster.local"
    return Proxy.from_node(base_pb2.Node(id=node_id, metadata=meta))


def sidecar(n: int, j: int) -> Proxy:
    return proxy(f"ns{n}", sidecar_ip(n, j), f"app-{j}", "app")


def full_config(gen: ConfigGenerator, push: PushContext, p: Proxy) -> int:
    """Generate CDS, EDS, LDS and RDS as a connecting sidecar asks for them; resources."""
    cds = gen.generate(typeurls.CLUSTER, p, push, None, None)
    assert cds is not None
    eds_names = frozenset(r.name for r in cds.resources if r.name.startswith("outbound|"))
    eds = gen.generate(typeurls.ENDPOINT, p, push, eds_names, None)
    lds = gen.generate(typeurls.LISTENER, p, push, None, None)
    rds = gen.generate(typeurls.ROUTE, p, push, None, None)
    assert eds is not None and lds is not None and rds is not None
    return len(cds.resources) + len(eds.resources) + len(lds.resources) + len(rds.resources)


def cpu_ms(fn: Callable[[], object]) -> float:
    t0 = time.process_time()
    fn()
    return (time.process_time() - t0) * 1000


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(samples), 2),
        "min": round(min(samples), 2),
        "max": round(max(samples), 2),
        "n": len(samples),
    }


class Mesh:
    def __init__(self, services: int, endpoints: int, namespaces: int) -> None:
        self.endpoints = endpoints
        self.docs = {f"svc{i}": service_docs(i, endpoints) for i in range(services)}
        self.docs.update({f"ns{n}": namespace_docs(n) for n in range(namespaces)})
        self.store = ConfigStore()
        self.apply()

    def apply(self) -> None:
        result = parse_text("---\n".join(self.docs.values()), "mesh.yaml")
        assert not result.errors, result.errors[:3]
        self.store.set_origin("mesh.yaml", result.configs)

    def push(self) -> PushContext:
        return PushContext.build(self.store.snapshot(), MeshConfig())


def run(services: int, endpoints: int, namespaces: int, repeat: int) -> dict[str, Any]:
    mesh = Mesh(services, endpoints, namespaces)
    push, gen = mesh.push(), ConfigGenerator()
    # As `meshpilot serve` does after loading: freeze what exists, collect less often.
    tune_gc()
    out: dict[str, Any] = {}
    sizes: dict[str, int] = {}

    def first() -> None:
        sizes["resources"] = full_config(gen, push, sidecar(0, 0))

    out["first_sidecar_ms"] = cpu_ms(first)
    out["resources_per_proxy"] = sizes["resources"]
    rss_one = rss_mb()
    count = min(repeat, namespaces - 1)
    if count > 0:
        out["new_namespace_sidecar_ms"] = summary(
            [cpu_ms(lambda n=n: full_config(gen, push, sidecar(n, 0))) for n in range(1, count + 1)]
        )
    out["new_workload_sidecar_same_namespace_ms"] = summary(
        [
            cpu_ms(lambda j=j: full_config(gen, push, sidecar(0, j)))
            for j in range(1, min(repeat, WORKLOADS - 1) + 1)
        ]
    )
    full_config(gen, push, proxy("ns0", "10.250.0.1", "client-0", "client"))
    out["existing_scope_proxy_ms"] = summary(
        [
            cpu_ms(
                lambda k=k: full_config(
                    gen, push, proxy("ns0", f"10.250.0.{k + 2}", f"client-{k + 1}", "client")
                )
            )
            for k in range(repeat)
        ]
    )
    for n in range(count + 1, namespaces):
        full_config(gen, push, sidecar(n, 0))
    rss_all = rss_mb()
    out["rss_mb_one_namespace"] = round(rss_one, 1)
    out["rss_mb_all_namespaces"] = round(rss_all, 1)
    if namespaces > 1:
        out["rss_kb_per_namespace"] = round((rss_all - rss_one) * 1000 / (namespaces - 1), 1)

    # Config changes: every sidecar seen so far (one per namespace, and those of ns0)
    # regenerates its full config from the new push context.
    connected = [sidecar(n, 0) for n in range(namespaces)] + [
        sidecar(0, j) for j in range(1, min(repeat, WORKLOADS - 1) + 1)
    ]
    for label, change in (
        ("destination_rule_change", lambda i: service_docs(i, endpoints, dr_interval="30s")),
        ("virtual_service_change", lambda i: service_docs(i, endpoints, weight=50)),
    ):
        per_proxy: list[float] = []
        totals: list[float] = []
        for k in range(repeat):
            i = 7 + k
            mesh.docs[f"svc{i}"] = change(i)
            mesh.apply()
            previous, push = push, mesh.push()
            gen.on_new_context(previous, push)
            samples = [cpu_ms(lambda p=p, c=push: full_config(gen, c, p)) for p in connected]
            per_proxy.append(statistics.median(samples))
            totals.append(sum(samples))
        out[f"{label}_per_proxy_ms"] = summary(per_proxy)
        out[f"{label}_all_{len(connected)}_proxies_ms"] = summary(totals)
    stats = getattr(gen, "resource_cache_stats", None)
    if callable(stats):
        out["resource_cache"] = stats()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=3)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--label", default="after")
    args = parser.parse_args()
    load = os.getloadavg()
    t0 = time.monotonic()
    result = run(args.services, args.endpoints, args.namespaces, args.repeat)
    record = {
        "label": args.label,
        "meshpilot": str(Path(meshpilot.__file__).parent),
        "services": args.services,
        "endpoints": args.endpoints,
        "namespaces": args.namespaces,
        "load_average_before": [round(x, 2) for x in load],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.monotonic() - t0, 1),
        **result,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"resource-cache-{args.services}x{args.namespaces}-{args.label}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
