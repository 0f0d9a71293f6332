"""The shared work: N services with E endpoints each, described once for both servers.

meshpilot gets them as Kubernetes `Service` + `WorkloadEntry` files (one YAML file per
service holding the Service and its WorkloadEntries, in namespace `bench`); sovereign
gets the same services as the instances of a JSON file source, rendered by Jinja
templates into equivalent clusters, endpoints, listeners and routes
(`sovereign_setup.py`).

Addresses: endpoint j of service i is 10.(1+j).x.y; Service VIPs 10.96.x.y; moved
endpoints 10.32.x.y; proxies that are not workloads 10.100.x.y. None overlaps another,
so only the sidecar proxies (whose IP is an endpoint's) get inbound listeners.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

NAMESPACE = "bench"
PORT = 9080
MAX_SERVICES = 65536
MAX_ENDPOINTS = 16


def _ip(first: int, i: int) -> str:
    return f"10.{first}.{(i // 256) % 256}.{i % 256}"


@dataclass(slots=True)
class Service:
    index: int
    endpoints: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"svc-{self.index}"

    @property
    def host(self) -> str:
        return f"{self.name}.{NAMESPACE}.svc.cluster.local"

    @property
    def vip(self) -> str:
        return _ip(96, self.index)


class Mesh:
    """N services x E endpoints; `move()` changes one endpoint's address."""

    def __init__(self, services: int, endpoints: int) -> None:
        if not 1 <= services <= MAX_SERVICES:
            raise ValueError(f"services: expected 1..{MAX_SERVICES}, got {services}")
        if not 1 <= endpoints <= MAX_ENDPOINTS:
            raise ValueError(f"endpoints: expected 1..{MAX_ENDPOINTS}, got {endpoints}")
        self.services = [
            Service(i, [_ip(1 + j, i) for j in range(endpoints)]) for i in range(services)
        ]
        self.moves = 0

    def move(self, index: int) -> tuple[Service, str]:
        """Give the first endpoint of service `index` a new, never used address."""
        self.moves += 1
        svc = self.services[index]
        new = _ip(32 + self.moves // 65536, self.moves)
        svc.endpoints[0] = new
        return svc, new

    def workload_ip(self, proxy: int) -> str:
        """The address of a distinct workload for sidecar proxy number `proxy`."""
        svc = self.services[proxy % len(self.services)]
        return svc.endpoints[-1]


def proxy_ip(proxy: int) -> str:
    return f"10.{100 + proxy // 65536}.{(proxy // 256) % 256}.{proxy % 256}"


def node_id(ip: str, name: str, namespace: str) -> str:
    """Istio's sidecar node id: `sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local`."""
    return f"sidecar~{ip}~{name}.{namespace}~{namespace}.svc.cluster.local"


# --- meshpilot: Kubernetes / Istio objects ------------------------------------------


def k8s_objects(svc: Service) -> list[dict[str, Any]]:
    """The Service and its WorkloadEntries (one per endpoint)."""
    objs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": svc.name, "namespace": NAMESPACE},
            "spec": {
                "selector": {"app": svc.name},
                "clusterIP": svc.vip,
                "ports": [{"name": "http", "port": PORT, "targetPort": PORT}],
            },
        }
    ]
    for j, address in enumerate(svc.endpoints):
        objs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "WorkloadEntry",
                "metadata": {"name": f"{svc.name}-{j}", "namespace": NAMESPACE},
                "spec": {"address": address, "labels": {"app": svc.name}},
            }
        )
    return objs


# --- sovereign: source instances -------------------------------------------------------


def sovereign_instance(svc: Service) -> dict[str, Any]:
    return {
        "name": svc.name,
        "namespace": NAMESPACE,
        "host": svc.host,
        "vip": svc.vip,
        "port": PORT,
        "endpoints": list(svc.endpoints),
    }


def sovereign_instances(mesh: Mesh) -> list[dict[str, Any]]:
    return [sovereign_instance(s) for s in mesh.services]
