"""The benchmark mesh: Kubernetes Services spread over namespaces, WorkloadEntries
behind them, and proxies that are the sidecars of those workloads.

A `Mesh` describes the objects and the proxies; the control plane process
(`bench.server`) loads its objects, the simulators (`bench.client`) take each proxy's
identity from it, and the runner asks it which proxies see which change.

- Namespaces: `bench` when there is one, else `ns-0` .. `ns-{N-1}`; service i lives in
  namespace i mod N. `istio-system` holds one more Service, `istio-ingressgateway`,
  which every proxy sees: the DestinationRule changes and the added Services go there,
  so that they reach every proxy, with or without Sidecars.
- Service `svc-i`: port 9080 named `http`, selector `app: svc-i`, a ClusterIP;
  `endpoints` WorkloadEntries `svc-i-e` (labels `app: svc-i`).
- Proxies (sidecar mode, the default): proxy j is the sidecar of WorkloadEntry
  `svc-(j mod S)-(j div S)`: its IP is that entry's address and its node metadata
  carries the namespace and labels, so it has service instances (inbound listeners)
  like every real sidecar. Empty mode (`sidecars=False`): proxies get IPs that are no
  endpoint of anything, all in one scope per namespace, as the benchmark first did.
- Sidecar per namespace (`sidecar_per_namespace`): namespace k imports `./*`,
  `istio-system/*` and the next five namespaces `ns-(k+1)` .. `ns-(k+5)` (mod N), so a
  proxy sees 6 of N namespaces. (`*/*` would equal no Sidecar; a namespace that
  talks to a handful of others is the usual reason to write one.)

Addresses: WorkloadEntries 10.0.0.0/12, moved WorkloadEntries 10.16.0.0/12, entries
of added namespaces 10.32.0.0/12, Service VIPs 10.96.0.0/12, empty-mode proxies
10.100.0.0/14, the gateway 10.250.0.1 (VIP 10.251.0.1); none overlaps another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NAMESPACE = "bench"
SHARED_NAMESPACE = "istio-system"
GATEWAY = "istio-ingressgateway"
PORT = 9080
GATEWAY_PORT = 80
IMPORTED_NEIGHBOURS = 5
# Largest mesh the address plan holds (10.0.0.0/12 for WorkloadEntries).
MAX_ENTRIES = 1 << 20


def _ip(base: int, i: int) -> str:
    return f"10.{base + i // 65536}.{(i // 256) % 256}.{i % 256}"


def fqdn(name: str, namespace: str) -> str:
    return f"{name}.{namespace}.svc.cluster.local"


# The one-namespace mesh of the other benches (one WorkloadEntry per Service).


def service(i: int, namespace: str = NAMESPACE) -> dict[str, Any]:
    return service_doc(f"svc-{i}", namespace, _ip(96, i))


def workload_entry(i: int, namespace: str = NAMESPACE, moved: int = 0) -> dict[str, Any]:
    """The WorkloadEntry behind svc-i; `moved` > 0 gives it a new address each time."""
    address = _ip(0, i) if moved == 0 else _ip(16, (i + moved * 7919) % MAX_ENTRIES)
    return workload_entry_doc(f"svc-{i}-0", namespace, address, f"svc-{i}")


def hostname(i: int, namespace: str = NAMESPACE) -> str:
    return fqdn(f"svc-{i}", namespace)


def service_doc(name: str, namespace: str, vip: str, port: int = PORT) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"app": name},
            "clusterIP": vip,
            "ports": [{"name": "http", "port": port, "targetPort": port}],
        },
    }


def workload_entry_doc(name: str, namespace: str, address: str, app: str) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"address": address, "labels": {"app": app}},
    }


def sidecar_doc(namespace: str, imports: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "Sidecar",
        "metadata": {"name": "default", "namespace": namespace},
        "spec": {"egress": [{"hosts": [f"{ns}/*" for ns in imports]}]},
    }


def destination_rule_doc(revision: int) -> dict[str, Any]:
    """The gateway's DestinationRule; each revision changes its connection pool."""
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "DestinationRule",
        "metadata": {"name": GATEWAY, "namespace": SHARED_NAMESPACE},
        "spec": {
            "host": fqdn(GATEWAY, SHARED_NAMESPACE),
            "trafficPolicy": {
                "connectionPool": {
                    "tcp": {"maxConnections": 1000 + revision},
                    "http": {"http1MaxPendingRequests": 1024},
                }
            },
        },
    }


@dataclass(frozen=True)
class ProxyIdentity:
    ip: str
    pod: str
    namespace: str
    labels: dict[str, str]

    def node_id(self) -> str:
        return f"sidecar~{self.ip}~{self.pod}.{self.namespace}~{self.namespace}.svc.cluster.local"


@dataclass(frozen=True)
class Mesh:
    services: int = 1000
    namespaces: int = 1
    endpoints: int = 1
    sidecars: bool = True
    sidecar_per_namespace: bool = False

    def check(self, proxies: int) -> None:
        """Refuse a mesh the address plan or the proxy mapping cannot hold."""
        if self.services < 1 or self.namespaces < 1 or self.endpoints < 1:
            raise ValueError("services, namespaces and endpoints must be >= 1")
        if self.namespaces > self.services:
            raise ValueError(f"--namespaces {self.namespaces} > --services {self.services}")
        if self.services * self.endpoints > MAX_ENTRIES:
            raise ValueError(f"services x endpoints must be <= {MAX_ENTRIES}")
        if self.sidecars and proxies > self.services * self.endpoints:
            raise ValueError(
                f"--proxies {proxies}: each proxy is the sidecar of one WorkloadEntry, and "
                f"there are only {self.services} x {self.endpoints}; raise --endpoints"
            )

    # --- namespaces and visibility -------------------------------------------------

    def namespace(self, k: int) -> str:
        return NAMESPACE if self.namespaces == 1 else f"ns-{k}"

    def namespace_of(self, service: int) -> str:
        return self.namespace(service % self.namespaces)

    def imports(self, k: int) -> list[str]:
        """The namespaces namespace k's Sidecar imports (itself first)."""
        out = [".", SHARED_NAMESPACE]
        for d in range(1, IMPORTED_NEIGHBOURS + 1):
            other = (k + d) % self.namespaces
            if other != k and self.namespace(other) not in out:
                out.append(self.namespace(other))
        return out

    def visible(self, proxy_namespace: str) -> frozenset[str] | None:
        """The namespaces whose services a proxy of `proxy_namespace` has (None: all)."""
        if not self.sidecar_per_namespace:
            return None
        if proxy_namespace.startswith("fresh-"):
            # Added namespaces import what ns-0's proxies see (see `fresh_namespace`).
            return (self.visible(self.namespace(0)) or frozenset()) | {proxy_namespace}
        k = self.namespace_index(proxy_namespace)
        if k is None:
            return frozenset({proxy_namespace, SHARED_NAMESPACE})
        own = self.namespace(k)
        return frozenset(own if ns == "." else ns for ns in self.imports(k))

    def sees(self, proxy_namespace: str, service_namespace: str) -> bool:
        """Whether a proxy of `proxy_namespace` has `service_namespace`'s services."""
        visible = self.visible(proxy_namespace)
        return visible is None or service_namespace in visible

    def namespace_index(self, namespace: str) -> int | None:
        if self.namespaces == 1:
            return 0 if namespace == NAMESPACE else None
        if namespace.startswith("ns-") and namespace[3:].isdigit():
            k = int(namespace[3:])
            return k if k < self.namespaces else None
        return None

    # --- objects -------------------------------------------------------------------

    def entry_address(self, service: int, endpoint: int) -> str:
        return _ip(0, endpoint * self.services + service)

    def moved_address(self, move: int, service: int) -> str:
        return _ip(16, (service + move * 7919) % MAX_ENTRIES)

    def service(self, i: int) -> dict[str, Any]:
        return service_doc(f"svc-{i}", self.namespace_of(i), _ip(96, i))

    def workload_entry(self, i: int, endpoint: int, address: str = "") -> dict[str, Any]:
        return workload_entry_doc(
            f"svc-{i}-{endpoint}",
            self.namespace_of(i),
            address or self.entry_address(i, endpoint),
            f"svc-{i}",
        )

    def gateway(self) -> list[dict[str, Any]]:
        return [
            service_doc(GATEWAY, SHARED_NAMESPACE, "10.251.0.1", GATEWAY_PORT),
            workload_entry_doc(f"{GATEWAY}-0", SHARED_NAMESPACE, "10.250.0.1", GATEWAY),
        ]

    def sidecars_docs(self) -> list[dict[str, Any]]:
        if not self.sidecar_per_namespace:
            return []
        return [sidecar_doc(self.namespace(k), self.imports(k)) for k in range(self.namespaces)]

    def extra_service(self, index: int) -> list[dict[str, Any]]:
        """A Service (and its WorkloadEntry) added at run time; every proxy sees it."""
        name = f"extra-{index}"
        return [
            service_doc(name, SHARED_NAMESPACE, _ip(96, self.services + index)),
            workload_entry_doc(f"{name}-0", SHARED_NAMESPACE, _ip(48, index), name),
        ]

    def fresh_namespace(self, k: int) -> tuple[list[dict[str, Any]], ProxyIdentity]:
        """A namespace added at run time with one Service, its WorkloadEntry and (with
        Sidecars) its own Sidecar importing what ns-0 imports; and its sidecar proxy."""
        ns, name, address = f"fresh-{k}", f"fresh-{k}", _ip(32, k)
        docs = [
            service_doc(name, ns, _ip(112, k)),
            workload_entry_doc(f"{name}-0", ns, address, name),
        ]
        if self.sidecar_per_namespace:
            own = self.namespace(0)
            imports = [".", *(ns for ns in self.imports(0) if ns != "."), own]
            docs.append(sidecar_doc(ns, imports))
        return docs, ProxyIdentity(address, f"{name}-0", ns, {"app": name})

    # --- proxies -------------------------------------------------------------------

    def proxy(self, j: int) -> ProxyIdentity:
        if not self.sidecars:
            ns = self.namespace(j % self.namespaces)
            return ProxyIdentity(_ip(100, j), f"proxy-{j}", ns, {})
        service, endpoint = j % self.services, j // self.services
        return ProxyIdentity(
            self.entry_address(service, endpoint),
            f"svc-{service}-{endpoint}",
            self.namespace_of(service),
            {"app": f"svc-{service}"},
        )

    def moved_entry(self, change: int) -> tuple[int, int]:
        """(service, endpoint) whose address change `change` moves: the last endpoint
        of a service, which is no proxy's own workload unless proxies fill every one."""
        return (change * 37) % self.services, self.endpoints - 1
