"""Services and endpoints derived from the store's Service, ServiceEntry and WorkloadEntry.

Pure functions of a store snapshot: the Kubernetes source and the file source both
store objects; this turns them into the mesh's service registry, as Istio's
serviceregistry controllers do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

from meshpilot.addresses import is_ip
from meshpilot.api.kube import KubeServiceSpec
from meshpilot.api.networking import ServiceEntrySpec, WorkloadEntrySpec
from meshpilot.config import Config, StoreSnapshot, kinds, oldest_first
from meshpilot.model.service import (
    Endpoint,
    Protocol,
    Resolution,
    Service,
    ServicePort,
    labels_match,
    parse_protocol,
    protocol_for_kube_port,
)

# hostname -> service port number -> endpoints
EndpointIndex = Mapping[str, Mapping[int, tuple[Endpoint, ...]]]

TLS_MODE_LABEL = "security.istio.io/tlsMode"
_LOCALITY_LABELS = (
    "topology.kubernetes.io/region",
    "topology.kubernetes.io/zone",
    "topology.istio.io/subzone",
)

_SE_RESOLUTION = {
    "NONE": Resolution.PASSTHROUGH,
    "STATIC": Resolution.CLIENT_SIDE_LB,
    "DNS": Resolution.DNS_LB,
    "DNS_ROUND_ROBIN": Resolution.DNS_ROUND_ROBIN,
}


def build_services(snapshot: StoreSnapshot, domain_suffix: str) -> dict[str, Service]:
    """All services by hostname. Kubernetes Services win a hostname clash, then age."""
    out: dict[str, Service] = {}
    for cfg in oldest_first(snapshot.of_kind(kinds.SERVICE).values()):
        svc = _from_kube_service(cfg, domain_suffix)
        out.setdefault(svc.hostname, svc)
    for cfg in oldest_first(snapshot.of_kind(kinds.SERVICE_ENTRY).values()):
        for svc in _from_service_entry(cfg):
            out.setdefault(svc.hostname, svc)
    return out


def build_endpoints(snapshot: StoreSnapshot, services: Mapping[str, Service]) -> EndpointIndex:
    """Endpoints per hostname and service port number."""
    entries: Iterable[Config] = snapshot.of_kind(kinds.WORKLOAD_ENTRY).values()
    if len(services) <= _FEW_SERVICES:
        # A few services (an endpoint-only change): index only the WorkloadEntries
        # their selectors can pick, not every entry of the mesh.
        selectors = [(s.namespace, s.selector) for s in services.values() if s.selector]
        entries = [cfg for cfg in entries if _selected(cfg, selectors)]
    workloads = WorkloadIndex(entries)
    index: dict[str, Mapping[int, tuple[Endpoint, ...]]] = {}
    for svc in services.values():
        index[svc.hostname] = MappingProxyType(_service_endpoints(svc, snapshot, workloads))
    return MappingProxyType(index)


_FEW_SERVICES = 8


def _selected(cfg: Config, selectors: list[tuple[str, Mapping[str, str]]]) -> bool:
    """Whether one of the selectors matches the entry's labels (spec labels win)."""
    own = cfg.spec.labels
    meta = cfg.labels
    for namespace, selector in selectors:
        if cfg.namespace == namespace and all(
            own.get(k, meta.get(k)) == v for k, v in selector.items()
        ):
            return True
    return False


class WorkloadIndex:
    """WorkloadEntries by namespace and by label, so a selector visits only candidates
    (a Service x WorkloadEntry scan is quadratic in a mesh of thousands)."""

    def __init__(self, configs: Iterable[Config]) -> None:
        self._by_label: dict[tuple[str, str, str], list[tuple[Config, dict[str, str]]]] = {}
        for cfg in sorted(configs, key=lambda c: (c.namespace, c.name)):
            labels = {**cfg.labels, **cfg.spec.labels}
            for k, v in labels.items():
                self._by_label.setdefault((cfg.namespace, k, v), []).append((cfg, labels))

    def select(
        self, namespace: str, selector: Mapping[str, str]
    ) -> list[tuple[Config, dict[str, str]]]:
        """Entries in `namespace` whose labels match `selector` (non-empty), by name."""
        buckets = [self._by_label.get((namespace, k, v), []) for k, v in selector.items()]
        smallest = min(buckets, key=len)
        return [(cfg, labels) for cfg, labels in smallest if labels_match(selector, labels)]


def _service_endpoints(
    svc: Service, snapshot: StoreSnapshot, workloads: WorkloadIndex
) -> dict[int, tuple[Endpoint, ...]]:
    per_port: dict[int, list[Endpoint]] = {p.port: [] for p in svc.ports}
    if svc.source is not None and svc.source.kind == kinds.SERVICE_ENTRY:
        se_cfg = snapshot.get(svc.source)
        spec: ServiceEntrySpec = se_cfg.spec if se_cfg else None  # type: ignore[assignment]
        if spec is not None and spec.endpoints:
            for we in spec.endpoints:
                for port in svc.ports:
                    ep = _endpoint(we, svc, port, svc.namespace, "", se_entry=True)
                    if ep is not None:
                        per_port[port.port].append(ep)
            return {k: tuple(v) for k, v in per_port.items()}
        if (
            spec is not None
            and svc.resolution
            in (
                Resolution.DNS_LB,
                Resolution.DNS_ROUND_ROBIN,
            )
            and spec.workload_selector is None
        ):
            # A DNS ServiceEntry without endpoints resolves its own host.
            for port in svc.ports:
                per_port[port.port].append(
                    Endpoint(svc.hostname, port.target_port or port.port, port.name)
                )
            return {k: tuple(v) for k, v in per_port.items()}
    if svc.resolution is Resolution.DNS_LB and svc.source is not None:
        kube_cfg = snapshot.get(svc.source)
        external = getattr(kube_cfg.spec, "external_name", "") if kube_cfg else ""
        if external:
            # ExternalName: the cluster resolves the external name, on the service port.
            for port in svc.ports:
                per_port[port.port].append(Endpoint(external, port.port, port.name))
            return {k: tuple(v) for k, v in per_port.items()}
    if svc.selector:
        for we_cfg, labels in workloads.select(svc.namespace, svc.selector):
            selected: WorkloadEntrySpec = we_cfg.spec
            for port in svc.ports:
                ep = _endpoint(selected, svc, port, we_cfg.namespace, we_cfg.name, labels=labels)
                if ep is not None:
                    per_port[port.port].append(ep)
    return {k: tuple(v) for k, v in per_port.items()}


def _endpoint(
    we: WorkloadEntrySpec,
    svc: Service,
    port: ServicePort,
    namespace: str,
    workload_name: str,
    *,
    labels: Mapping[str, str] | None = None,
    se_entry: bool = False,
) -> Endpoint | None:
    address = we.address
    if not address:
        return None
    if address.startswith("unix://"):
        return None
    if svc.resolution is Resolution.CLIENT_SIDE_LB and not is_ip(address):
        # EDS carries IPs only; a hostname endpoint needs a DNS ServiceEntry.
        return None
    if port.name in we.ports:
        number = we.ports[port.name]
    elif port.target_port_name and port.target_port_name in we.ports:
        number = we.ports[port.target_port_name]
    elif port.target_port:
        number = port.target_port
    else:
        number = port.port
    labels = dict(labels if labels is not None else we.labels)
    return Endpoint(
        address=address,
        port=number,
        service_port_name=port.name,
        labels=labels,
        locality=we.locality or _locality_from_labels(labels),
        weight=we.weight or 1,
        service_account=we.service_account or ("" if se_entry else "default"),
        network=we.network,
        tls_mode=labels.get(TLS_MODE_LABEL, "disabled"),
        workload_name=workload_name,
        namespace=namespace,
    )


def _locality_from_labels(labels: Mapping[str, str]) -> str:
    parts = [labels.get(k, "") for k in _LOCALITY_LABELS]
    while parts and not parts[-1]:
        parts.pop()
    return "/".join(parts)


def _export_to(values: list[str]) -> frozenset[str]:
    return frozenset(values) if values else frozenset({"*"})


def _from_kube_service(cfg: Config, domain_suffix: str) -> Service:
    spec: KubeServiceSpec = cfg.spec
    ports = tuple(
        ServicePort(
            name=p.name,
            port=p.port,
            protocol=protocol_for_kube_port(p.name, p.app_protocol, p.protocol),
            target_port=p.target_port if isinstance(p.target_port, int) else None,
            target_port_name=p.target_port if isinstance(p.target_port, str) else "",
        )
        for p in spec.ports
    )
    hostname = f"{cfg.name}.{cfg.namespace}.svc.{domain_suffix}"
    resolution = Resolution.CLIENT_SIDE_LB
    if spec.type == "ExternalName":
        resolution = Resolution.DNS_LB
    elif spec.cluster_ip == "None":
        resolution = Resolution.PASSTHROUGH
    export = cfg.annotations.get("networking.istio.io/exportTo", "")
    return Service(
        hostname=hostname,
        namespace=cfg.namespace,
        name=cfg.name,
        ports=ports,
        resolution=resolution,
        addresses=(spec.cluster_ip,) if spec.cluster_ip and spec.cluster_ip != "None" else (),
        export_to=_export_to([s.strip() for s in export.split(",") if s.strip()]),
        source=cfg.key,
        creation_timestamp=cfg.creation_timestamp,
        labels=cfg.labels,
        selector=dict(spec.selector) if spec.selector else None,
    )


def _from_service_entry(cfg: Config) -> list[Service]:
    spec: ServiceEntrySpec = cfg.spec
    ports = tuple(
        ServicePort(
            name=p.name or str(p.number),
            port=p.number,
            protocol=parse_protocol(p.protocol) or Protocol.TCP,
            target_port=p.target_port,
        )
        for p in spec.ports
    )
    selector = dict(spec.workload_selector.labels) if spec.workload_selector else None
    return [
        Service(
            hostname=host,
            namespace=cfg.namespace,
            name=cfg.name,
            ports=ports,
            resolution=_SE_RESOLUTION[spec.resolution],
            addresses=tuple(spec.addresses),
            mesh_external=spec.location == "MESH_EXTERNAL",
            export_to=_export_to(spec.export_to),
            source=cfg.key,
            creation_timestamp=cfg.creation_timestamp,
            labels=cfg.labels,
            selector=selector,
        )
        for host in spec.hosts
    ]
