"""The bridge from push contexts to xDS resources: calls translators, caches results.

The server asks for a type; this decides what that proxy gets. Two levels of caching:

* Per resource, across push contexts (Istio's XdsCache): each outbound cluster and
  each outbound virtual host is serialized once and kept under a key made of exactly
  what it depends on (the service, the DestinationRule revision that applies, the
  VirtualService revision, mesh settings, the proxy's SDS capability), never of the
  proxy's IP or namespace unless the content depends on it. A config change thus
  rebuilds only the resources whose inputs changed, and scopes that see the same
  services (every namespace, with default visibility) share every entry.
* Per scope, per push context: a scope's outbound answer is a selection of those
  serialized resources, assembled once. A sidecar's answer is its own small part
  (inbound clusters and listeners, from its service instances and IP) joined with
  the outbound part it shares with every proxy of its scope; route configurations do
  not depend on the proxy's own part at all.

Where Istio keys route configurations as a whole, here they are assembled at the wire
level from cached serialized virtual hosts (rds.py), so a VirtualService change
rebuilds only its hosts' virtual hosts. What namespaces see (views.py) replaces the
namespace in keys, so namespaces that see the same mesh share outbound output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.message import Message

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.translators import clusters, endpoints, listeners, naming, routes, tls
from meshpilot.translators.traffic_policy import dr_identity
from meshpilot.xds import typeurls
from meshpilot.xds.cache import (
    MAX_RESOURCES,
    EdsKey,
    EdsOutKey,
    EdsViewKey,
    NamespaceKey,
    ResourceCache,
    RouteScopeKey,
    RoutesOutKey,
    ScopeKey,
    ScopeNamespaceKey,
    WholeKey,
    XdsCache,
)
from meshpilot.xds.rds import RouteAssembler
from meshpilot.xds.resources import Generated, Joined, Resource
from meshpilot.xds.views import MeshViews


class ConfigGenerator:
    """Implements `meshpilot.xds.resources.Generator` on top of the translators."""

    def __init__(self, max_resources: int = MAX_RESOURCES) -> None:
        # Across push contexts, by dependencies: outbound clusters and assembled route
        # configurations.
        self._resources: ResourceCache[Hashable, Resource] = ResourceCache(max_resources)
        # A sidecar's own part of CDS and LDS (inbound, fixed), by its scope key and
        # the instances' services: a config change elsewhere does not rebuild it.
        self._own: ResourceCache[Hashable, tuple[Resource, ...]] = ResourceCache(max_resources)
        # Views of what namespaces see, and tokens for long key parts (views.py).
        self._views = MeshViews()
        # Virtual hosts and route configurations (rds.py).
        self._rds = RouteAssembler(self._views, self._resources, max_resources)
        # One cache per kind of entry, each with its typed key (meshpilot/xds/cache.py).
        self._whole: XdsCache[WholeKey, Sequence[Resource]] = XdsCache()
        self._outbound: XdsCache[WholeKey, tuple[Resource, ...]] = XdsCache()
        self._route_scopes: XdsCache[RouteScopeKey, dict[str, Resource]] = XdsCache()
        self._routes_out: XdsCache[RoutesOutKey, tuple[Resource, ...]] = XdsCache()
        self._label_names: XdsCache[NamespaceKey, tuple[str, ...]] = XdsCache()
        self._cds_locality_of: XdsCache[ScopeNamespaceKey, bool] = XdsCache()
        self._eds: XdsCache[EdsKey, Resource] = XdsCache()
        self._eds_out: XdsCache[EdsOutKey, tuple[Resource, ...]] = XdsCache()
        self._eds_keys: XdsCache[EdsViewKey, dict[str, EdsKey]] = XdsCache()
        # Cluster name -> host and back, for incremental EDS pushes. Only names of
        # clusters that exist get in: clients cannot grow it with made-up names.
        self._host_of: dict[str, str] = {}
        self._names_by_host: dict[str, set[str]] = {}

    def _caches(self) -> dict[str, XdsCache[Any, Any]]:
        return {
            "whole": self._whole,
            "outbound": self._outbound,
            "route_scopes": self._route_scopes,
            "routes_out": self._routes_out,
            "route_shared": self._rds.shared,
            "label_names": self._label_names,
            "cds_locality": self._cds_locality_of,
            "eds": self._eds,
            "eds_out": self._eds_out,
            "eds_keys": self._eds_keys,
        }

    def table_sizes(self) -> dict[str, int]:
        """Entries in each cache and index, for tests and debugging."""
        sizes = {name: len(cache) for name, cache in self._caches().items()}
        sizes["resources"] = len(self._resources)
        sizes["vhosts"] = len(self._rds.vhosts)
        sizes["own"] = len(self._own)
        sizes["tokens"] = self._views.token_count()
        sizes["host_of"] = len(self._host_of)
        sizes["names_by_host"] = sum(len(v) for v in self._names_by_host.values())
        return sizes

    def cache_stats(self) -> tuple[int, int]:
        """(hits, misses) over every cache."""
        caches = self._caches().values()
        return sum(c.hits for c in caches), sum(c.misses for c in caches)

    def resource_cache_stats(self) -> dict[str, int]:
        """Reads, size and evictions of the per-resource caches (Istio's XdsCache
        metrics: pilot_xds_cache_reads, pilot_xds_cache_size, pilot_xds_cache_evictions)."""
        caches = (self._resources, self._rds.vhosts, self._own)
        return {
            "hits": sum(c.hits for c in caches),
            "misses": sum(c.misses for c in caches),
            "size": sum(len(c) for c in caches),
            "evictions": sum(c.evictions for c in caches),
        }

    # --- scope keys: proxies with equal keys get identical output --------------------

    @staticmethod
    def _proxy_scope(push: PushContext, proxy: Proxy) -> ScopeKey:
        scope = push.sidecar_scope(proxy)
        instances = tuple(
            (i.service.hostname, i.port.port, i.endpoint_port)
            for i in push.service_instances(proxy)
        )
        # Ingress listeners bind to (and default endpoints point at) the proxy's own IP;
        # otherwise only the IP family matters (DNS lookup family, passthrough source).
        ip = proxy.ip_addresses if (scope.ingress or instances) else ()
        families = tuple(":" in a for a in proxy.ip_addresses)
        return ScopeKey(
            proxy.type,
            scope.key,
            instances,
            ip,
            families,
            proxy.interception_mode,
            proxy.dns_domain,
            tls.proxy_has_sds(proxy),
        )

    # --- Generator ----------------------------------------------------------------------

    def generate(
        self,
        type_url: str,
        proxy: Proxy,
        push: PushContext,
        names: frozenset[str] | None,
        request: PushRequest | None,
    ) -> Generated | None:
        incremental = request is not None and not request.full
        if type_url == typeurls.ENDPOINT:
            return self._endpoints(push, proxy, names, request if incremental else None)
        if incremental:
            return None
        if type_url == typeurls.CLUSTER:
            return self._clusters(push, proxy)
        if type_url == typeurls.LISTENER:
            return self._listeners(push, proxy)
        if type_url == typeurls.ROUTE:
            return self._routes(push, proxy, names)
        return None

    # --- CDS ----------------------------------------------------------------------------

    def _clusters(self, push: PushContext, proxy: Proxy) -> Generated:
        scope = self._proxy_scope(push, proxy)
        locality = self._cds_locality(push, proxy)
        # Proxies without a part of their own (no service instances, no ingress) have
        # equal scope keys: the whole answer is theirs to share.
        own_shared = not scope.ips and not scope.instances

        def make() -> Sequence[Resource]:
            outbound = self._outbound.get_or_build(
                push.version,
                WholeKey(typeurls.CLUSTER, self._views.cds_scope(push, proxy, scope), locality),
                lambda: self._outbound_clusters(push, proxy),
            )
            own = self._own.get_or_build(
                ("cds", scope, self._own_deps(push, proxy)),
                lambda: tuple(
                    _resource(c, typeurls.CLUSTER) for c in clusters.local_clusters(push, proxy)
                ),
            )
            if own and outbound and own[-1].name >= outbound[0].name:
                # Not in name order as two parts (never with Istio's names): one list.
                return tuple(sorted((*own, *outbound), key=lambda r: r.name))
            return Joined((own, outbound), (own_shared, True))

        key = WholeKey(typeurls.CLUSTER, scope, locality)
        return Generated(self._whole.get_or_build(push.version, key, make), shared=own_shared)

    def _own_deps(self, push: PushContext, proxy: Proxy) -> Hashable:
        """Besides the scope key (instances by port, IPs, Sidecar revision): what the
        proxy's own clusters and listeners take from its services and the mesh."""
        return (
            self._views.mesh_token(push),
            tuple(self._views.host_token(push, i.service) for i in push.service_instances(proxy)),
        )

    def _outbound_clusters(self, push: PushContext, proxy: Proxy) -> tuple[Resource, ...]:
        """The scope's outbound clusters, each from the per-resource cache: keyed by the
        service (and what of its endpoints a cluster carries: identities, TLS modes),
        the DestinationRule that applies, mesh settings and SDS; DNS clusters carry
        endpoints ordered for the proxy's locality and are built for the scope."""
        mesh = self._views.mesh_token(push)
        sds = tls.proxy_has_sds(proxy)
        cache = self._resources
        # Built only on a miss; shared by a service's clusters (Struct.update is slow).
        timeout = clusters.connect_timeout_of(push)
        metadata: dict[str, struct_pb2.Struct] = {}
        out = []
        for spec in clusters.outbound_cluster_specs(push, proxy):
            if spec.inline_endpoints:
                out.append(
                    _resource(clusters.build_outbound_cluster(push, proxy, spec), typeurls.CLUSTER)
                )
                continue
            key = (
                spec.name,
                self._views.host_token(push, spec.service),
                dr_identity(spec.rule),
                mesh,
                sds,
            )
            out.append(
                cache.get_or_build(key, _cluster_builder(push, proxy, spec, timeout, metadata))
            )
        return tuple(out)

    # --- LDS ----------------------------------------------------------------------------

    def _listeners(self, push: PushContext, proxy: Proxy) -> Generated:
        scope = self._proxy_scope(push, proxy)
        labels = self._source_labels(push, proxy)
        security = self._inbound_security(push, proxy)
        own_shared = not scope.ips and not scope.instances

        def make() -> Sequence[Resource]:
            outbound = self._outbound.get_or_build(
                push.version,
                WholeKey(typeurls.LISTENER, self._views.lds_scope(push, proxy, scope), labels),
                lambda: tuple(
                    _resource(lst, typeurls.LISTENER)
                    for _, lst in sorted(listeners.outbound_listeners(push, proxy).items())
                ),
            )
            taken = frozenset(r.name for r in outbound)
            own = self._own.get_or_build(
                ("lds", scope, self._own_deps(push, proxy), security, taken),
                lambda: tuple(
                    _resource(lst, typeurls.LISTENER)
                    for lst in listeners.local_listeners(push, proxy, taken)
                ),
            )
            # A handful of listeners: one sorted list (names of both parts interleave).
            return tuple(sorted((*outbound, *own), key=lambda r: r.name))

        key = WholeKey(typeurls.LISTENER, scope, (labels, security))
        return Generated(self._whole.get_or_build(push.version, key, make), shared=own_shared)

    # --- RDS ----------------------------------------------------------------------------

    def _routes(self, push: PushContext, proxy: Proxy, names: frozenset[str] | None) -> Generated:
        # Route configurations never depend on the proxy's own instances or IP.
        scope_key = RouteScopeKey(
            _outbound_only(self._proxy_scope(push, proxy)), self._source_labels(push, proxy)
        )
        # One shared answer per scope and subscription: the server then frames (and may
        # send) the same bytes to every proxy of the scope.
        out_key = RoutesOutKey(scope_key, names)
        shared = self._routes_out.get(push.version, out_key)
        if shared is not None:
            return Generated(shared, complete=True)

        by_name = self._route_scopes.get_or_build(
            push.version, scope_key, lambda: self._rds.route_configs(push, proxy, scope_key)
        )
        # The scope's route configurations are those its listeners name.
        wanted = sorted(names) if names is not None else sorted(by_name)
        missing = [name for name in wanted if name not in by_name]
        if missing:
            # Names the scope does not produce still get an answer (an empty config, so
            # Envoy does not wait for them), built in one call for this request only:
            # caching made-up names would let any client grow the cache.
            extra = {
                rc.name: _resource(rc, typeurls.ROUTE)
                for rc in routes.build_route_configs(push, proxy, missing)
            }
            answer = tuple(by_name.get(name) or extra[name] for name in wanted)
            return Generated(answer, complete=True, shared=False)
        out = [by_name[name] for name in wanted]
        result = self._routes_out.get_or_build(push.version, out_key, lambda: tuple(out))
        return Generated(result, complete=True)

    def _source_labels(self, push: PushContext, proxy: Proxy) -> Hashable:
        """The proxy's values of labels VirtualService sourceLabels look at (routes and
        TCP listeners differ by them); the label names are found once per namespace,
        or once for all namespaces that see the same VirtualServices."""
        names = self._label_names.get_or_build(
            push.version,
            NamespaceKey(self._views.routing_view(push, proxy.namespace)),
            lambda: tuple(routes.source_label_names(push, proxy.namespace)),
        )
        return tuple((k, proxy.labels.get(k)) for k in names) if names else None

    @staticmethod
    def _inbound_security(push: PushContext, proxy: Proxy) -> Hashable:
        """The PeerAuthentication and AuthorizationPolicy configs (keys and revisions) that
        select this proxy: inbound chains differ by them, and by nothing else of its labels."""
        return push.security.inbound_key(proxy.namespace, proxy.labels)

    def _cds_locality(self, push: PushContext, proxy: Proxy) -> Hashable:
        """Proxy locality and labels, for scopes whose DNS clusters carry endpoints
        ordered by locality (DestinationRule failover or distribute); else None."""
        depends = self._cds_locality_of.get_or_build(
            push.version,
            ScopeNamespaceKey(self._proxy_scope(push, proxy), proxy.namespace),
            lambda: clusters.dns_clusters_depend_on_locality(push, proxy),
        )
        if not depends:
            return None
        return (proxy.locality, tuple(sorted(proxy.labels.items())))

    def _endpoints(
        self,
        push: PushContext,
        proxy: Proxy,
        names: frozenset[str] | None,
        request: PushRequest | None,
    ) -> Generated | None:
        if not names:
            return Generated((), complete=True) if request is None else None
        hosts = None
        if request is not None:
            hosts = request.eds_hosts
            if push.changed_hosts is not None:
                hosts = hosts | push.changed_hosts
        # Proxies of one namespace and locality with the same (interned) subscription
        # share one answer: a lookup instead of a walk over every name, and one tuple,
        # so the server frames the block once.
        # Assignments depend on the namespace only through DestinationRule lookup.
        view = EdsViewKey(self._views.rule_view(push, proxy.namespace), proxy.locality)
        out_key = EdsOutKey(view, names, hosts)
        shared = self._eds_out.get(push.version, out_key)
        if shared is not None:
            return Generated(shared, complete=request is None)
        wanted: Iterable[str] = names
        if hosts is not None:
            # Walk the few changed hosts, not the proxy's (possibly thousands of) names:
            # this runs once per connected proxy on every endpoint change.
            by_host = self._names_by_host
            wanted = [n for h in hosts for n in by_host.get(h, ()) if n in names]
            if not wanted:
                return None
        # Cache keys depend on the proxy's namespace and locality (and rarely its labels):
        # memoized per push for each such pair, so a proxy whose assignments are all
        # built already costs a dict lookup per name.
        memo = self._eds_keys.get_or_build(push.version, view, dict)
        ordered = sorted(wanted)
        out = tuple(self._load_assignment(push, proxy, name, memo) for name in ordered)
        if all(n in memo for n in ordered):
            # Every assignment exists and none depends on this proxy's labels: share it.
            out = self._eds_out.get_or_build(push.version, out_key, lambda: out)
            return Generated(out, complete=request is None)
        return Generated(out, complete=request is None, shared=False)

    def _load_assignment(
        self, push: PushContext, proxy: Proxy, cluster_name: str, memo: dict[str, EdsKey]
    ) -> Resource:
        # Keyed per cluster and, only where DestinationRule subsets or locality make the
        # assignment proxy-dependent, per rule and locality: proxies share the rest.
        key = memo.get(cluster_name)
        if key is not None:
            return self._eds.get_or_build(
                push.version,
                key,
                lambda: _resource(
                    endpoints.build_load_assignment(push, proxy, cluster_name), typeurls.ENDPOINT
                ),
            )
        translator_key, build = endpoints.eds_cache_entry(push, proxy, cluster_name)
        if translator_key == ("eds", cluster_name):
            # No such cluster (or subset): an empty assignment, so Envoy stops waiting
            # for it. Not cached, memoized or indexed: names are client-supplied.
            return _resource(build(), typeurls.ENDPOINT)
        key = EdsKey.of(translator_key)
        self._index_name(cluster_name)
        if not key.uses_proxy_labels:
            memo[cluster_name] = key
        return self._eds.get_or_build(
            push.version, key, lambda: _resource(build(), typeurls.ENDPOINT)
        )

    def _index_name(self, name: str) -> None:
        """Remember the host of a subscribed, existing cluster (parsed once per name)."""
        if name in self._host_of:
            return
        if len(self._host_of) >= _MAX_INDEXED_NAMES:
            self._host_of.clear()
            self._names_by_host.clear()
        host = self._host_of[name] = _cluster_host(name)
        self._names_by_host.setdefault(host, set()).add(name)

    def on_new_context(self, previous: PushContext | None, current: PushContext) -> None:
        """Carry unchanged ClusterLoadAssignments over to the new context: those of hosts
        whose endpoints did not change. An assignment's key holds the rest of what it
        depends on (the DestinationRule where a subset or locality setting applies, the
        proxy's locality), so after a config change only the affected keys are new."""
        if previous is None:
            return
        changed = current.changed_hosts
        if changed is None:
            if previous.mesh != current.mesh:
                return
            old, new = previous.endpoints, current.endpoints
            changed = frozenset(h for h in old.keys() | new.keys() if old.get(h) != new.get(h))

        def keep(key: EdsKey) -> bool:
            name = key.cluster_name
            return (self._host_of.get(name) or _cluster_host(name)) not in changed

        self._eds.carry_over(previous.version, current.version, keep)


_MAX_INDEXED_NAMES = 500_000


def _outbound_only(scope: ScopeKey) -> ScopeKey:
    """The scope key without the proxy's own part: what outbound output depends on."""
    if not scope.instances and not scope.ips:
        return scope
    return dataclasses.replace(scope, instances=(), ips=())


def _cluster_builder(
    push: PushContext,
    proxy: Proxy,
    spec: clusters.OutboundClusterSpec,
    timeout: duration_pb2.Duration,
    metadata: dict[str, struct_pb2.Struct],
) -> Callable[[], Resource]:
    def build() -> Resource:
        host = spec.service.hostname
        md = metadata.get(host)
        if md is None:
            md = metadata[host] = clusters.service_metadata(spec.service)
        cluster = clusters.build_outbound_cluster(push, proxy, spec, timeout, md)
        return _resource(cluster, typeurls.CLUSTER)

    return build


def _cluster_host(cluster_name: str) -> str:
    parsed = naming.parse_cluster_name(cluster_name)
    return parsed[3] if parsed else ""


def _resource(message: Message, type_url: str) -> Resource:
    name = message.cluster_name if type_url == typeurls.ENDPOINT else message.name  # type: ignore[attr-defined]
    return Resource.of(name, message, type_url)
