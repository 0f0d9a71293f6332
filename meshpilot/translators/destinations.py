"""VirtualService destinations to Istio cluster names, and which clusters a proxy has.

Routes, TCP/TLS chains and mirrors all name clusters through `resolve`, and ask
`ClusterSet.has` before pointing at one. A listener whose tcp_proxy names a missing
cluster drops every connection, so TCP/TLS chains and mirrors leave missing clusters
out; an HTTP weighted split keeps them, as Istio does, so that their share of
requests gets 503 NC (http_route.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from meshpilot.api.networking import Destination
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.routing import MESH_GATEWAY
from meshpilot.model.service import Protocol, Service
from meshpilot.translators import naming


@dataclass(frozen=True, slots=True)
class ResolvedDestination:
    """A Destination as the proxy sees it: FQDN, service (None if unknown), port, cluster."""

    host: str
    service: Service | None
    port: int
    subset: str

    @property
    def cluster(self) -> str:
        return naming.outbound_cluster_name(self.port, self.subset, self.host)


def resolve(
    push: PushContext,
    services: Mapping[str, Service],
    vs_namespace: str,
    dest: Destination,
    listener_port: int,
) -> ResolvedDestination:
    """Istio's GetDestinationCluster: the destination port, else the service's only
    port, else the port the request came in on. Short hosts live in the VS namespace."""
    host = push.resolve_host(dest.host, vs_namespace)
    service = services.get(host)
    if dest.port is not None:
        port = dest.port.number
    elif service is not None and len(service.ports) == 1:
        port = service.ports[0].port
    else:
        port = listener_port
    return ResolvedDestination(host, service, port, dest.subset)


def outbound_cluster_names(push: PushContext, proxy: Proxy) -> frozenset[str]:
    """Names of the `outbound|PORT|SUBSET|HOST` clusters CDS sends `proxy`.

    A cluster exists iff its host is a service in the proxy's sidecar scope, its port
    is one of that service's (non-UDP) ports, and its subset is "" or a subset of the
    DestinationRule that applies to the proxy. Routes must name only these, and
    clusters.build_clusters builds exactly these (a unit test holds both to it).
    """
    names: set[str] = set()
    for svc in push.sidecar_scope(proxy).services:
        ports = [sp.port for sp in svc.ports if sp.protocol is not Protocol.UDP]
        if not ports:
            continue
        dr = push.destination_rule(proxy.namespace, svc)
        subsets = ["", *(s.name for s in dr.spec.subsets)] if dr is not None else [""]
        for port in ports:
            for subset in subsets:
                names.add(naming.outbound_cluster_name(port, subset, svc.hostname))
    return frozenset(names)


class ClusterSet:
    """Lazily computed `outbound_cluster_names`, with the scope's services by host."""

    def __init__(self, push: PushContext, proxy: Proxy) -> None:
        self.push = push
        self.proxy = proxy
        self._names: frozenset[str] | None = None
        self._services: Mapping[str, Service] | None = None

    @property
    def services(self) -> Mapping[str, Service]:
        if self._services is None:
            self._services = self.push.sidecar_scope(self.proxy).services_by_host
        return self._services

    def has(self, cluster: str) -> bool:
        if self._names is None:
            self._names = outbound_cluster_names(self.push, self.proxy)
        return cluster in self._names

    def resolve(
        self, vs_namespace: str, dest: Destination, listener_port: int
    ) -> ResolvedDestination:
        return resolve(self.push, self.services, vs_namespace, dest, listener_port)


def static_match(
    proxy: Proxy,
    *,
    port: int | None,
    listener_port: int,
    source_labels: Mapping[str, str],
    source_namespace: str,
    gateways: list[str],
) -> bool:
    """The parts of a VirtualService match decided at generation time for a sidecar:
    the listener port, the proxy's labels and namespace, and the `mesh` gateway."""
    if port is not None and port != listener_port:
        return False
    # Istio skips the label check when a match names gateways that include "mesh";
    # a match that says `sourceLabels` should still be bound by them, so check both.
    if gateways and MESH_GATEWAY not in gateways:
        return False
    if any(proxy.labels.get(k) != v for k, v in source_labels.items()):
        return False
    return not source_namespace or source_namespace == proxy.namespace
