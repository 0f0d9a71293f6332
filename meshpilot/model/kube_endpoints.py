"""Endpoints of Kubernetes Services from their EndpointSlices, Pods and Nodes.

Istio's EndpointSlice controller (pilot/pkg/serviceregistry/kube/controller/
endpointslice.go) builds one IstioEndpoint per slice endpoint address and slice port:
the port number is the slice's, matched to the Service port by NAME (Kubernetes has
already resolved a named targetPort into it); labels, service account and tlsMode
come from the Pod the endpoint's `targetRef` names; locality from the Pod's
`istio-locality` label, else its Node's topology labels. meshpilot does the same,
falling back to the slice endpoint's `zone` when the Node is not known.

Health, as Istio with its defaults: `ready` unset or true is healthy; a terminating
endpoint is TERMINATING (older Istio: UNHEALTHY, or DRAINING for services with its
persistent-session label, which meshpilot does not implement); any other not-ready
endpoint is UNHEALTHY. Istio's EDS builder never sends terminating endpoints, and
sends unhealthy ones only with PILOT_SEND_UNHEALTHY_ENDPOINTS (off by default);
meshpilot leaves both out, so a terminating-but-serving endpoint gets no new
requests even when no ready one is left (kube-proxy would fall back to it; Istio
does not). An endpoint whose `targetRef` names a Pod the store does not hold yet
is left out until the Pod arrives, as Istio does (it would lack labels and identity).

Slices with addressType FQDN are ignored, as Istio ignores them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import replace

from meshpilot.api.kube import EndpointSliceSpec, NodeSpec, PodSpec
from meshpilot.config import Config, ConfigKey, StoreSnapshot, kinds
from meshpilot.model.service import Endpoint, Service

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
TLS_MODE_LABEL = "security.istio.io/tlsMode"
# Istio's pod label for an explicit locality, "region.zone.subzone".
LOCALITY_LABEL = "istio-locality"

# (namespace, name) of a Service or a Pod.
_Name = tuple[str, str]


def slice_service(cfg: Config) -> _Name | None:
    """The (namespace, name) of the Service a slice belongs to, from its label."""
    name = cfg.labels.get(SERVICE_NAME_LABEL, "")
    return (cfg.namespace, name) if name else None


def _pod_refs(cfg: Config) -> set[_Name]:
    spec: EndpointSliceSpec = cfg.spec
    return {
        (e.target_ref.namespace or cfg.namespace, e.target_ref.name)
        for e in spec.endpoints
        if e.target_ref is not None and e.target_ref.kind == "Pod" and e.target_ref.name
    }


def _by_name(cfg: Config) -> str:
    return cfg.name


class SliceIndex:
    """EndpointSlices by Service, and the Services whose slices name a Pod or sit on a
    Node, so that a slice, Pod or Node change recomputes only the services it feeds.

    Immutable: `updated()` copies the outer maps (C-level copies) and replaces the
    entries the change touches.
    """

    __slots__ = ("_by_service", "_node_pods", "_pod_services")

    def __init__(self, slices: Iterable[Config] = (), pods: Iterable[Config] = ()) -> None:
        by_service: dict[_Name, list[Config]] = {}
        pod_services: dict[_Name, set[_Name]] = {}
        for cfg in sorted(slices, key=_by_name):
            svc = slice_service(cfg)
            if svc is None:
                continue
            by_service.setdefault(svc, []).append(cfg)
            for pod in _pod_refs(cfg):
                pod_services.setdefault(pod, set()).add(svc)
        node_pods: dict[str, set[_Name]] = {}
        for pod_cfg in pods:
            node = pod_cfg.spec.node_name
            if node:
                node_pods.setdefault(node, set()).add((pod_cfg.namespace, pod_cfg.name))
        self._by_service = {k: tuple(v) for k, v in by_service.items()}
        self._pod_services = {k: frozenset(v) for k, v in pod_services.items()}
        self._node_pods = {k: frozenset(v) for k, v in node_pods.items()}

    def slices(self, namespace: str, name: str) -> tuple[Config, ...]:
        return self._by_service.get((namespace, name), ())

    def services_of_pod(self, namespace: str, name: str) -> frozenset[_Name]:
        return self._pod_services.get((namespace, name), frozenset())

    def pods_on_node(self, node: str) -> frozenset[_Name]:
        return self._node_pods.get(node, frozenset())

    def updated(self, removed: Iterable[Config], added: Iterable[Config]) -> SliceIndex:
        """This index without the `removed` slices and Pods (as they were indexed) and
        with the `added` ones; other kinds are ignored."""
        index = SliceIndex()
        by_service = index._by_service = dict(self._by_service)
        pod_services = index._pod_services = dict(self._pod_services)
        node_pods = index._node_pods = dict(self._node_pods)
        added = list(added)
        touched_pods: set[_Name] = set()
        for cfg in removed:
            if cfg.kind == kinds.ENDPOINT_SLICE and (svc := slice_service(cfg)) is not None:
                bucket = by_service.get(svc, ())
                i = bisect.bisect_left(bucket, cfg.name, key=_by_name)
                if i < len(bucket) and bucket[i].name == cfg.name:
                    bucket = bucket[:i] + bucket[i + 1 :]
                if bucket:
                    by_service[svc] = bucket
                else:
                    by_service.pop(svc, None)
                touched_pods |= _pod_refs(cfg)
            elif cfg.kind == kinds.POD and (node := cfg.spec.node_name):
                left = node_pods.get(node, frozenset()) - {(cfg.namespace, cfg.name)}
                if left:
                    node_pods[node] = left
                else:
                    node_pods.pop(node, None)
        for cfg in added:
            if cfg.kind == kinds.ENDPOINT_SLICE and (svc := slice_service(cfg)) is not None:
                bucket = by_service.get(svc, ())
                i = bisect.bisect_left(bucket, cfg.name, key=_by_name)
                by_service[svc] = (*bucket[:i], cfg, *bucket[i:])
                touched_pods |= _pod_refs(cfg)
            elif cfg.kind == kinds.POD and (node := cfg.spec.node_name):
                node_pods[node] = node_pods.get(node, frozenset()) | {(cfg.namespace, cfg.name)}
        # A Pod may be named by several slices: recount its services from those left
        # (each service's Pods gathered once, not once per Pod: slices are large).
        named: dict[_Name, set[_Name]] = {}

        def pods_of(svc: _Name) -> set[_Name]:
            found = named.get(svc)
            if found is None:
                found = named[svc] = set()
                for slice_cfg in by_service.get(svc, ()):
                    found |= _pod_refs(slice_cfg)
            return found

        for pod in touched_pods:
            candidates = set(self._pod_services.get(pod, frozenset()))
            candidates |= {
                svc
                for cfg in added
                if cfg.kind == kinds.ENDPOINT_SLICE and (svc := slice_service(cfg)) is not None
            }
            services = frozenset(svc for svc in candidates if pod in pods_of(svc))
            if services:
                pod_services[pod] = services
            else:
                pod_services.pop(pod, None)
        return index


def slice_endpoints(
    svc: Service,
    snapshot: StoreSnapshot,
    slices: Iterable[Config],
    per_port: dict[int, list[Endpoint]],
) -> None:
    """Add the healthy endpoints of `slices` (the Service's, by name) to `per_port`."""
    seen: set[tuple[int, str, int]] = set()
    for slice_cfg in slices:
        spec: EndpointSliceSpec = slice_cfg.spec
        if spec.address_type == "FQDN":
            continue
        ports = [
            (svc_port.port, svc_port.name, sp.port)
            for sp in spec.ports
            if sp.port is not None and (svc_port := svc.port_by_name(sp.name)) is not None
        ]
        if not ports:
            continue
        for e in spec.endpoints:
            if e.conditions.ready is False:
                continue
            pod: Config | None = None
            ref = e.target_ref
            if ref is not None and ref.kind == "Pod":
                pod = snapshot.get(
                    ConfigKey(kinds.POD, ref.namespace or slice_cfg.namespace, ref.name)
                )
                if pod is None:
                    continue
            template = _template(pod, e.node_name, e.zone, snapshot, slice_cfg.namespace)
            for address in e.addresses:
                for svc_port_number, port_name, number in ports:
                    dedupe = (svc_port_number, address, number)
                    if dedupe in seen:
                        # The same address in two slices (a slice handover): once.
                        continue
                    seen.add(dedupe)
                    per_port[svc_port_number].append(
                        replace(template, address=address, port=number, service_port_name=port_name)
                    )


def _template(
    pod: Config | None, node_name: str, zone: str, snapshot: StoreSnapshot, namespace: str
) -> Endpoint:
    """The fields every endpoint of one slice endpoint shares (address and port aside)."""
    if pod is None:
        return Endpoint(
            "", 0, locality=_node_locality(snapshot, node_name, zone), namespace=namespace
        )
    spec: PodSpec = pod.spec
    labels = dict(pod.labels)
    locality = labels.get(LOCALITY_LABEL, "").replace(".", "/")
    return Endpoint(
        "",
        0,
        labels=labels,
        locality=locality or _node_locality(snapshot, spec.node_name or node_name, zone),
        service_account=spec.service_account_name or "default",
        tls_mode=labels.get(TLS_MODE_LABEL, "disabled"),
        workload_name=pod.name,
        namespace=pod.namespace,
    )


def _node_locality(snapshot: StoreSnapshot, node_name: str, zone: str) -> str:
    node = snapshot.get(ConfigKey(kinds.NODE, "", node_name)) if node_name else None
    if node is not None:
        spec: NodeSpec = node.spec
        parts = [spec.region, spec.zone, spec.subzone]
    else:
        parts = ["", zone, ""]
    while parts and not parts[-1]:
        parts.pop()
    return "/".join(parts)


def pod_identity(cfg: Config | None) -> tuple[object, ...] | None:
    """What a proxy takes from its Pod (labels, service account, IPs); None if absent."""
    if cfg is None:
        return None
    spec: PodSpec = cfg.spec
    return (tuple(sorted(cfg.labels.items())), spec.service_account_name, tuple(spec.pod_ips))
