"""The benchmark mesh: N Kubernetes Services, each selecting one WorkloadEntry.

All objects live in one namespace with full visibility (no Sidecar), so every proxy
sees every service: one cluster, one ClusterLoadAssignment and one virtual host each.
Addresses: WorkloadEntries 10.0.0.0/12, moved WorkloadEntries 10.16.0.0/12, Service
VIPs 10.96.0.0/12, proxies 10.100.0.0/14 (node ids only); none overlaps another, so
no proxy is an endpoint of a service and all proxies share one scope.
"""

from __future__ import annotations

from typing import Any

NAMESPACE = "bench"
PORT = 9080


def _ip(base: int, i: int) -> str:
    return f"10.{base + i // 65536}.{(i // 256) % 256}.{i % 256}"


def service(i: int, namespace: str = NAMESPACE) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": f"svc-{i}", "namespace": namespace},
        "spec": {
            "selector": {"app": f"svc-{i}"},
            "clusterIP": _ip(96, i),
            "ports": [{"name": "http", "port": PORT, "targetPort": PORT}],
        },
    }


def workload_entry(i: int, namespace: str = NAMESPACE, moved: int = 0) -> dict[str, Any]:
    """The WorkloadEntry behind svc-i; `moved` > 0 gives it a new address each time."""
    address = _ip(0, i) if moved == 0 else _ip(16, (i + moved * 7919) % (1 << 20))
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {"name": f"svc-{i}-0", "namespace": namespace},
        "spec": {"address": address, "labels": {"app": f"svc-{i}"}},
    }


def hostname(i: int, namespace: str = NAMESPACE) -> str:
    return f"svc-{i}.{namespace}.svc.cluster.local"
