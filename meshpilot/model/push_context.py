"""PushContext: an immutable, indexed view of the whole mesh for one push.

Built once per debounced push from a store snapshot; translators read only from it.
An endpoint-only change derives a new context that shares everything but the
endpoint index, and recomputes endpoints only for the services it touches.

Istio keeps endpoints outside the PushContext, in a mutable EndpointIndex that the
registries update in place (EDSUpdate) and pushes read under a lock. meshpilot keeps
them in the context, as immutable maps: an endpoint change copies the outer maps
(C-level copies of a few thousand references) and replaces the changed services'
entries, so a push in flight keeps reading the state it started with.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from meshpilot.api.kube import PodSpec
from meshpilot.api.mesh import MeshConfig
from meshpilot.config import Config, ConfigKey, StoreSnapshot, kinds, oldest_first
from meshpilot.model.kube_endpoints import SliceIndex, pod_identity, slice_service
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_request import ENDPOINT_ONLY_KINDS
from meshpilot.model.registry import (
    EndpointIndex,
    SelectorIndex,
    WorkloadIndex,
    build_endpoints,
    build_services,
    new_slice_index,
)
from meshpilot.model.routing import (
    DestinationRuleIndex,
    ResolvedDestinationRule,
    ResolvedVirtualService,
    VirtualServiceIndex,
    resolve_host,
    resolve_virtual_services,
)
from meshpilot.model.security import SecurityIndex
from meshpilot.model.service import Endpoint, Service, ServicePort, labels_match
from meshpilot.model.sidecar_scope import SidecarScope, build_sidecar_scope

# Sortable and distinct across restarts: versions from a later start compare greater.
START_ID = f"{int(time.time() * 1000):x}{os.getpid() % 4096:03x}"
_counter = itertools.count(1)


def next_version() -> str:
    return f"{START_ID}-{next(_counter)}"


@dataclass(frozen=True, slots=True)
class ServiceInstance:
    """A service port served by a proxy, and the port its application listens on."""

    service: Service
    port: ServicePort
    endpoint_port: int


@dataclass(eq=False)
class PushContext:
    version: str
    snapshot: StoreSnapshot
    mesh: MeshConfig
    services: Mapping[str, Service]
    endpoints: EndpointIndex
    # Hostnames whose endpoints differ from the previous context; None: unknown/all.
    changed_hosts: frozenset[str] | None = None
    _services_sorted: tuple[Service, ...] = ()
    _sidecars_by_ns: Mapping[str, tuple[Config, ...]] = field(default_factory=dict)
    _scope_cache: dict[tuple[str, ConfigKey | None], SidecarScope] = field(default_factory=dict)
    # Lazily built per-context indexes (the context is immutable, so they never go stale).
    _instances_cache: dict[tuple[Any, ...], tuple[ServiceInstance, ...]] = field(
        default_factory=dict
    )
    _label_instances: dict[tuple[Any, ...], list[ServiceInstance]] = field(default_factory=dict)
    _by_ip: dict[str, tuple[tuple[Service, ServicePort, Endpoint], ...]] | None = None
    _by_ns: dict[str, list[Service]] | None = None
    # Routing config; shared unchanged by endpoint-only contexts.
    _virtual_services: tuple[ResolvedVirtualService, ...] = ()
    _vs_by_ns: dict[str, VirtualServiceIndex] = field(default_factory=dict)
    _destination_rules: DestinationRuleIndex | None = None
    # PeerAuthentication and AuthorizationPolicy; shared unchanged by endpoint-only contexts.
    _security: SecurityIndex | None = None
    _identities: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Set on an endpoint-only context whose changes alter what clusters carry (the
    # SPIFFE identities auto mTLS verifies): the push must rebuild CDS after all.
    requires_full_push: bool = False
    # What endpoint-only changes update instead of rebuilding: WorkloadEntries by
    # label, and services by selector label.
    _workloads: WorkloadIndex | None = None
    _selectors: SelectorIndex | None = None
    # EndpointSlices by Service, and the Services a Pod or Node feeds.
    _slices: SliceIndex | None = None

    # --- construction --------------------------------------------------------------------

    @staticmethod
    def build(snapshot: StoreSnapshot, mesh: MeshConfig) -> PushContext:
        services = build_services(snapshot, mesh.domain_suffix)
        workloads = WorkloadIndex(snapshot.of_kind(kinds.WORKLOAD_ENTRY).values())
        slices = new_slice_index(snapshot)
        endpoints = build_endpoints(snapshot, services, workloads, slices)
        ctx = PushContext._assemble(snapshot, mesh, services, endpoints, None)
        ctx._workloads = workloads
        ctx._slices = slices
        return ctx

    def with_endpoint_changes(
        self, snapshot: StoreSnapshot, changed: frozenset[ConfigKey]
    ) -> PushContext:
        """A context for an endpoint-only change (WorkloadEntry, EndpointSlice, Pod,
        Node, Namespace): same services, some new endpoints.

        Istio's incremental EDS update: only the services that select a changed entry,
        own a changed slice, or have slices naming a changed Pod or a Pod on a changed
        Node (before or after the change) get their endpoints recomputed; the endpoint
        index, the endpoints-by-IP index and the per-proxy caches are copied from this
        context with those hosts replaced; services, routing, Sidecar scopes and
        security are shared by reference. This context is left as it was.
        """
        if any(key.kind not in ENDPOINT_ONLY_KINDS for key in changed):
            return PushContext.build(snapshot, self.mesh)
        before = [c for key in changed if (c := self.snapshot.get(key)) is not None]
        after = [c for key in changed if (c := snapshot.get(key)) is not None]
        selectors = self._selector_index()
        affected = {
            svc.hostname: svc
            for cfg in (*before, *after)
            if cfg.kind == kinds.WORKLOAD_ENTRY
            for svc in selectors.selecting(cfg)
        }
        workloads = self._workload_index().updated(
            [c for c in before if c.kind == kinds.WORKLOAD_ENTRY],
            [c for c in after if c.kind == kinds.WORKLOAD_ENTRY],
        )
        old_slices = self._slice_index()
        slices = old_slices.updated(before, after)
        for ns, name in self._kube_services_fed(changed, before, after, old_slices, slices):
            host = f"{name}.{ns}.svc.{self.mesh.domain_suffix}"
            svc = self.services.get(host)
            if svc is not None and svc.source is not None and svc.source.kind == kinds.SERVICE:
                affected[host] = svc
        fresh = build_endpoints(snapshot, affected, workloads, slices)
        endpoints = dict(self.endpoints)
        changed_hosts: set[str] = set()
        for host, per_port in fresh.items():
            # Unchanged hosts keep their mapping object: readers (analysis) compare by
            # identity to find what to redo.
            if per_port != endpoints.get(host):
                changed_hosts.add(host)
                endpoints[host] = per_port
        ctx = PushContext(
            version=next_version(),
            snapshot=snapshot,
            mesh=self.mesh,
            services=self.services,
            endpoints=MappingProxyType(endpoints),
            changed_hosts=frozenset(changed_hosts),
            _services_sorted=self._services_sorted,
            _sidecars_by_ns=self._sidecars_by_ns,
            _virtual_services=self._virtual_services,
            _vs_by_ns=self._vs_by_ns,
            _destination_rules=self._destination_rules,
            _security=self._security,
        )
        ctx._workloads = workloads
        ctx._selectors = selectors
        ctx._slices = slices
        # Scopes, label-selected instances and services per namespace depend on
        # services and Sidecars only, both unchanged.
        ctx._scope_cache = self._scope_cache
        ctx._label_instances = self._label_instances
        ctx._by_ns = self._by_ns
        if changed_hosts:
            ips = self._carry_over_by_ip(ctx, changed_hosts)
            ctx._instances_cache = {
                k: v for k, v in self._instances_cache.items() if ips.isdisjoint(k[2])
            }
            identities = dict(self._identities)
            for host in changed_hosts:
                identities.pop(host, None)
            ctx._identities = identities
        else:
            ctx._by_ip = self._by_ip
            ctx._instances_cache = self._instances_cache
            ctx._identities = self._identities
        ctx.requires_full_push = any(
            self._cluster_identity(self.services[host])
            != ctx._cluster_identity(self.services[host])
            for host in changed_hosts
        ) or any(
            # A proxy of this Pod sees other labels, identity or IPs: its listeners,
            # Sidecar and policies may change (Istio pushes that proxy in full).
            pod_identity(self.snapshot.get(key)) != pod_identity(snapshot.get(key))
            for key in changed
            if key.kind == kinds.POD
        )
        return ctx

    @staticmethod
    def _kube_services_fed(
        changed: frozenset[ConfigKey],
        before: list[Config],
        after: list[Config],
        old: SliceIndex,
        new: SliceIndex,
    ) -> set[tuple[str, str]]:
        """(namespace, name) of the Kubernetes Services whose endpoints the changed
        slices, Pods and Nodes feed, before or after the change."""
        fed: set[tuple[str, str]] = set()
        for cfg in (*before, *after):
            if cfg.kind == kinds.ENDPOINT_SLICE and (svc := slice_service(cfg)) is not None:
                fed.add(svc)
        pods = {(k.namespace, k.name) for k in changed if k.kind == kinds.POD}
        for key in changed:
            if key.kind == kinds.NODE:
                pods |= old.pods_on_node(key.name) | new.pods_on_node(key.name)
        for ns, name in pods:
            fed |= old.services_of_pod(ns, name) | new.services_of_pod(ns, name)
        return fed

    def _carry_over_by_ip(self, ctx: PushContext, changed_hosts: set[str]) -> set[str]:
        """Give `ctx` this context's endpoints-by-IP index with the changed hosts'
        entries replaced (when this one has it built); the IPs whose entries changed."""
        ips: set[str] = set()
        added: dict[str, list[tuple[Service, ServicePort, Endpoint]]] = {}
        for host in changed_hosts:
            svc = self.services[host]
            old, new = self.endpoints.get(host, {}), ctx.endpoints.get(host, {})
            for per_port in old.values():
                ips.update(ep.address for ep in per_port)
            for port in svc.ports:
                for ep in new.get(port.port, ()):
                    ips.add(ep.address)
                    added.setdefault(ep.address, []).append((svc, port, ep))
        if self._by_ip is None:
            return ips
        by_ip = dict(self._by_ip)
        for ip in ips:
            kept = [e for e in by_ip.get(ip, ()) if e[0].hostname not in changed_hosts]
            # Services in hostname order, as a full build has them (stable: each
            # service's entries stay in port, then endpoint order).
            entries = sorted(kept + added.get(ip, []), key=lambda e: e[0].hostname)
            if entries:
                by_ip[ip] = tuple(entries)
            else:
                by_ip.pop(ip, None)
        ctx._by_ip = by_ip
        return ips

    def _workload_index(self) -> WorkloadIndex:
        if self._workloads is None:
            self._workloads = WorkloadIndex(self.snapshot.of_kind(kinds.WORKLOAD_ENTRY).values())
        return self._workloads

    def _slice_index(self) -> SliceIndex:
        if self._slices is None:
            self._slices = new_slice_index(self.snapshot)
        return self._slices

    def _selector_index(self) -> SelectorIndex:
        # Built on the first endpoint change, not at start-up; shared from then on.
        if self._selectors is None:
            self._selectors = SelectorIndex(self._services_sorted)
        return self._selectors

    @staticmethod
    def _assemble(
        snapshot: StoreSnapshot,
        mesh: MeshConfig,
        services: Mapping[str, Service],
        endpoints: EndpointIndex,
        changed_hosts: frozenset[str] | None,
    ) -> PushContext:
        sidecars: dict[str, list[Config]] = {}
        for cfg in snapshot.of_kind(kinds.SIDECAR).values():
            sidecars.setdefault(cfg.namespace, []).append(cfg)
        return PushContext(
            version=next_version(),
            snapshot=snapshot,
            mesh=mesh,
            services=MappingProxyType(dict(services)),
            endpoints=endpoints,
            changed_hosts=changed_hosts,
            _services_sorted=tuple(sorted(services.values(), key=lambda s: s.hostname)),
            _sidecars_by_ns={ns: tuple(oldest_first(v)) for ns, v in sidecars.items()},
            _virtual_services=tuple(
                resolve_virtual_services(
                    snapshot.of_kind(kinds.VIRTUAL_SERVICE).values(), mesh.domain_suffix
                )
            ),
            _destination_rules=DestinationRuleIndex(
                snapshot.of_kind(kinds.DESTINATION_RULE).values(),
                mesh.domain_suffix,
                mesh.root_namespace,
            ),
            _security=SecurityIndex(snapshot.by_kind, mesh.root_namespace),
        )

    # --- queries -------------------------------------------------------------------------

    @property
    def services_sorted(self) -> tuple[Service, ...]:
        return self._services_sorted

    def service_endpoints(self, hostname: str, port: int) -> tuple[Endpoint, ...]:
        return self.endpoints.get(hostname, {}).get(port, ())

    def visible_services(self, namespace: str) -> tuple[Service, ...]:
        return tuple(s for s in self._services_sorted if _exported_to(s, namespace))

    def proxy_view(self, proxy: Proxy) -> Proxy:
        """The proxy as its Pod says, when the store holds the Pod its node id names:
        the Pod's labels, service account and IPs are authoritative over bootstrap
        metadata (Istio's SetWorkloadLabels and service targets read the Pod too).
        The proxy itself when there is no such Pod (file mode, VMs)."""
        name = proxy.pod_name
        pod = self.snapshot.get(ConfigKey(kinds.POD, proxy.namespace, name)) if name else None
        if pod is None:
            return proxy
        spec: PodSpec = pod.spec
        labels = dict(pod.labels)
        account = spec.service_account_name or "default"
        ips = tuple(spec.pod_ips) or proxy.ip_addresses
        if (labels, account, ips) == (proxy.labels, proxy.service_account, proxy.ip_addresses):
            return proxy
        return dataclasses.replace(proxy, labels=labels, service_account=account, ip_addresses=ips)

    def sidecar_for(self, proxy: Proxy) -> Config | None:
        """Istio's choice: workload-selected Sidecar in the proxy's namespace (oldest
        first), else that namespace's default, else the root namespace's default."""
        proxy = self.proxy_view(proxy)
        candidates = self._sidecars_by_ns.get(proxy.namespace, ())
        for cfg in candidates:
            sel = cfg.spec.workload_selector
            if sel is not None and sel.labels and labels_match(sel.labels, proxy.labels):
                return cfg
        for cfg in candidates:
            if cfg.spec.workload_selector is None or not cfg.spec.workload_selector.labels:
                return cfg
        for cfg in self._sidecars_by_ns.get(self.mesh.root_namespace, ()):
            if cfg.spec.workload_selector is None or not cfg.spec.workload_selector.labels:
                return cfg
        return None

    def sidecar_scope(self, proxy: Proxy) -> SidecarScope:
        sidecar = self.sidecar_for(proxy) if not proxy.is_router else None
        cache_key = (proxy.namespace, sidecar.key if sidecar else None)
        scope = self._scope_cache.get(cache_key)
        if scope is None:
            scope = build_sidecar_scope(
                proxy.namespace,
                sidecar,
                self.visible_services(proxy.namespace),
                self.mesh.outbound_traffic_policy.mode,
            )
            self._scope_cache[cache_key] = scope
        return scope

    def service_instances(self, proxy: Proxy) -> tuple[ServiceInstance, ...]:
        """Service ports this proxy serves: endpoints at its IP, else services whose
        selector matches its labels in its namespace."""
        proxy = self.proxy_view(proxy)
        cache_key = (proxy.namespace, tuple(sorted(proxy.labels.items())), proxy.ip_addresses)
        cached = self._instances_cache.get(cache_key)
        if cached is not None:
            return cached
        found: dict[tuple[str, int], ServiceInstance] = {}
        by_ip = self._endpoints_by_ip()
        for ip in proxy.ip_addresses:
            for svc, port, ep in by_ip.get(ip, ()):
                found.setdefault((svc.hostname, port.port), ServiceInstance(svc, port, ep.port))
        # The label part does not depend on the IP: once per (namespace, labels), not
        # once per proxy (every proxy has its own IP, so the cache above never hits).
        label_key = cache_key[:2]
        by_labels = self._label_instances.get(label_key)
        if by_labels is None:
            by_labels = self._label_instances[label_key] = [
                ServiceInstance(svc, port, port.target_port or port.port)
                for svc in self._services_by_ns().get(proxy.namespace, ())
                if svc.selector and labels_match(svc.selector, proxy.labels)
                for port in svc.ports
            ]
        for inst in by_labels:
            found.setdefault((inst.service.hostname, inst.port.port), inst)
        result = tuple(found[k] for k in sorted(found))
        self._instances_cache[cache_key] = result
        return result

    def _endpoints_by_ip(self) -> dict[str, tuple[tuple[Service, ServicePort, Endpoint], ...]]:
        if self._by_ip is None:
            index: dict[str, list[tuple[Service, ServicePort, Endpoint]]] = {}
            for svc in self._services_sorted:
                by_port = self.endpoints.get(svc.hostname, {})
                for port in svc.ports:
                    for ep in by_port.get(port.port, ()):
                        index.setdefault(ep.address, []).append((svc, port, ep))
            self._by_ip = {ip: tuple(entries) for ip, entries in index.items()}
        return self._by_ip

    def _services_by_ns(self) -> dict[str, list[Service]]:
        if self._by_ns is None:
            index: dict[str, list[Service]] = {}
            for svc in self._services_sorted:
                index.setdefault(svc.namespace, []).append(svc)
            self._by_ns = index
        return self._by_ns

    # --- routing ---------------------------------------------------------------------------

    def resolve_host(self, host: str, namespace: str) -> str:
        """A host as written in config (short or FQDN) to the FQDN Istio means by it."""
        return resolve_host(host, namespace, self.mesh.domain_suffix)

    @property
    def virtual_services_all(self) -> tuple[ResolvedVirtualService, ...]:
        return self._virtual_services

    def virtual_services(self, namespace: str) -> VirtualServiceIndex:
        """Sidecar ("mesh") VirtualServices visible from `namespace`, one per host."""
        index = self._vs_by_ns.get(namespace)
        if index is None:
            index = self._vs_by_ns[namespace] = VirtualServiceIndex(
                self._virtual_services, namespace
            )
        return index

    def virtual_service_for(self, namespace: str, hostname: str) -> ResolvedVirtualService | None:
        return self.virtual_services(namespace).for_host(hostname)

    @property
    def destination_rules(self) -> DestinationRuleIndex:
        assert self._destination_rules is not None
        return self._destination_rules

    def destination_rule(self, client_ns: str, service: Service) -> ResolvedDestinationRule | None:
        """Istio's order: the client's namespace, the service's, then the root namespace."""
        return self.destination_rules.lookup(client_ns, service.hostname, service.namespace)

    def configs(self, kind: str) -> Mapping[ConfigKey, Config]:
        return self.snapshot.of_kind(kind)

    # --- security ------------------------------------------------------------------------

    @property
    def security(self) -> SecurityIndex:
        """PeerAuthentication and AuthorizationPolicy lookups (model/security.py)."""
        assert self._security is not None
        return self._security

    def service_identities(self, svc: Service) -> tuple[str, ...]:
        """SPIFFE identities a client verifies when it talks mTLS to `svc` (Istio's
        ServiceAccounts): those of the service's endpoints, plus a ServiceEntry's
        `subjectAltNames`, sorted."""
        cached = self._identities.get(svc.hostname)
        if cached is not None:
            return cached
        td = self.mesh.trust_domain
        found: set[str] = set()
        for per_port in self.endpoints.get(svc.hostname, {}).values():
            for ep in per_port:
                if ep.service_account:
                    found.add(
                        f"spiffe://{td}/ns/{ep.namespace or svc.namespace}/sa/{ep.service_account}"
                    )
        if svc.source is not None:
            source = self.snapshot.get(svc.source)
            found.update(getattr(source.spec, "subject_alt_names", ()) if source else ())
        result = tuple(sorted(found))
        self._identities[svc.hostname] = result
        return result

    def _cluster_identity(self, svc: Service) -> Hashable:
        """What outbound clusters of `svc` take from its endpoints: identities, and for
        passthrough services whether every endpoint runs a sidecar (auto mTLS)."""
        modes = frozenset(
            ep.tls_mode
            for per_port in self.endpoints.get(svc.hostname, {}).values()
            for ep in per_port
        )
        return (self.service_identities(svc), modes)


def _exported_to(svc: Service, namespace: str) -> bool:
    exp = svc.export_to
    if "*" in exp or namespace in exp:
        return True
    return "." in exp and svc.namespace == namespace
