"""Services and endpoints derived from the store's Service, ServiceEntry, WorkloadEntry
and (from the Kubernetes source) EndpointSlice, Pod and Node objects.

Pure functions of a store snapshot: the Kubernetes source and the file source both
store objects; this turns them into the mesh's service registry, as Istio's
serviceregistry controllers do.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from types import MappingProxyType

from meshpilot.addresses import is_ip
from meshpilot.api.kube import KubeServiceSpec
from meshpilot.api.networking import ServiceEntrySpec, WorkloadEntrySpec
from meshpilot.config import Config, StoreSnapshot, kinds, oldest_first
from meshpilot.model.kube_endpoints import SliceIndex, slice_endpoints
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


def build_endpoints(
    snapshot: StoreSnapshot,
    services: Mapping[str, Service],
    workloads: WorkloadIndex | None = None,
    slices: SliceIndex | None = None,
) -> EndpointIndex:
    """Endpoints per hostname and service port number.

    `workloads` and `slices` index the snapshot's WorkloadEntries and EndpointSlices;
    an endpoint-only change passes the indexes it updated, so only the services it
    names cost anything.
    """
    if workloads is None:
        workloads = WorkloadIndex(snapshot.of_kind(kinds.WORKLOAD_ENTRY).values())
    if slices is None:
        slices = new_slice_index(snapshot)
    index: dict[str, Mapping[int, tuple[Endpoint, ...]]] = {}
    for svc in services.values():
        index[svc.hostname] = MappingProxyType(_service_endpoints(svc, snapshot, workloads, slices))
    return MappingProxyType(index)


def new_slice_index(snapshot: StoreSnapshot) -> SliceIndex:
    return SliceIndex(
        snapshot.of_kind(kinds.ENDPOINT_SLICE).values(), snapshot.of_kind(kinds.POD).values()
    )


def workload_labels(cfg: Config) -> dict[str, str]:
    """A WorkloadEntry's labels as selectors see them: spec labels win over metadata."""
    return {**cfg.labels, **cfg.spec.labels}


# (namespace, label, value): the unit both indexes below are keyed by.
_LabelKey = tuple[str, str, str]
_Workload = tuple[Config, dict[str, str]]


def _by_name(entry: _Workload) -> str:
    return entry[0].name


class WorkloadIndex:
    """WorkloadEntries by namespace and by label, so a selector visits only candidates
    (a Service x WorkloadEntry scan is quadratic in a mesh of thousands).

    Immutable: `updated()` returns a new index that shares every bucket the change
    does not touch, so an endpoint change costs O(labels of the changed entries), not
    O(entries). Buckets are tuples ordered by name (one namespace per bucket).
    """

    __slots__ = ("_by_label",)

    def __init__(self, configs: Iterable[Config] = ()) -> None:
        by_label: dict[_LabelKey, list[_Workload]] = {}
        for cfg in sorted(configs, key=lambda c: (c.namespace, c.name)):
            labels = workload_labels(cfg)
            for k, v in labels.items():
                by_label.setdefault((cfg.namespace, k, v), []).append((cfg, labels))
        self._by_label: dict[_LabelKey, tuple[_Workload, ...]] = {
            k: tuple(v) for k, v in by_label.items()
        }

    def select(self, namespace: str, selector: Mapping[str, str]) -> list[_Workload]:
        """Entries in `namespace` whose labels match `selector` (non-empty), by name."""
        buckets = [self._by_label.get((namespace, k, v), ()) for k, v in selector.items()]
        smallest = min(buckets, key=len)
        return [(cfg, labels) for cfg, labels in smallest if labels_match(selector, labels)]

    def updated(self, removed: Iterable[Config], added: Iterable[Config]) -> WorkloadIndex:
        """This index without the `removed` entries (as they were indexed) and with the
        `added` ones; a changed entry is removed in its old form and added in its new."""
        by_label = dict(self._by_label)
        for cfg in removed:
            for k, v in workload_labels(cfg).items():
                key = (cfg.namespace, k, v)
                bucket = by_label.get(key, ())
                i = bisect.bisect_left(bucket, cfg.name, key=_by_name)
                if i < len(bucket) and bucket[i][0].name == cfg.name:
                    bucket = bucket[:i] + bucket[i + 1 :]
                if bucket:
                    by_label[key] = bucket
                else:
                    by_label.pop(key, None)
        for cfg in added:
            labels = workload_labels(cfg)
            for k, v in labels.items():
                key = (cfg.namespace, k, v)
                bucket = by_label.get(key, ())
                i = bisect.bisect_left(bucket, cfg.name, key=_by_name)
                by_label[key] = (*bucket[:i], (cfg, labels), *bucket[i:])
        index = WorkloadIndex()
        index._by_label = by_label
        return index


class SelectorIndex:
    """Services by the labels their selectors require, to find the services that pick
    (or picked) one WorkloadEntry without walking every service."""

    __slots__ = ("_by_label",)

    def __init__(self, services: Iterable[Service]) -> None:
        by_label: dict[_LabelKey, list[Service]] = {}
        for svc in services:
            if svc.selector:
                # One bucket per service is enough: a match needs every label anyway.
                k, v = next(iter(svc.selector.items()))
                by_label.setdefault((svc.namespace, k, v), []).append(svc)
        self._by_label: dict[_LabelKey, tuple[Service, ...]] = {
            k: tuple(v) for k, v in by_label.items()
        }

    def selecting(self, cfg: Config) -> list[Service]:
        """Services in the entry's namespace whose selector matches its labels."""
        labels = workload_labels(cfg)
        found: list[Service] = []
        for k, v in labels.items():
            for svc in self._by_label.get((cfg.namespace, k, v), ()):
                if svc.selector and labels_match(svc.selector, labels):
                    found.append(svc)
        return found


def _service_endpoints(
    svc: Service, snapshot: StoreSnapshot, workloads: WorkloadIndex, slices: SliceIndex
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
    if svc.source is not None and svc.source.kind == kinds.SERVICE:
        # Kubernetes source: the slices' endpoints; WorkloadEntries the selector picks
        # are added after them, as Istio merges both registries' endpoints.
        slice_endpoints(svc, snapshot, slices.slices(svc.namespace, svc.name), per_port)
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
