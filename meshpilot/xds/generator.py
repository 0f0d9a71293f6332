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
level from cached serialized virtual hosts (a repeated field's encoding is the
concatenation of its elements'), so a VirtualService change rebuilds only its hosts'
virtual hosts.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.message import Message

from meshpilot.config import ConfigKey
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.model.routing import ResolvedVirtualService, VirtualServiceIndex, exported_to
from meshpilot.model.service import Service
from meshpilot.model.sidecar_scope import SidecarScope
from meshpilot.translators import clusters, endpoints, listeners, naming, plan, routes, tls
from meshpilot.translators.http_route import HttpRouteBuilder
from meshpilot.translators.traffic_policy import dr_identity
from meshpilot.xds import typeurls, wire
from meshpilot.xds.cache import (
    MAX_RESOURCES,
    EdsKey,
    EdsOutKey,
    EdsViewKey,
    NamespaceKey,
    ResourceCache,
    RouteScopeKey,
    RouteShareKey,
    RoutesOutKey,
    ScopeKey,
    ScopeNamespaceKey,
    WholeKey,
    XdsCache,
)
from meshpilot.xds.resources import Generated, Joined, Resource


class ConfigGenerator:
    """Implements `meshpilot.xds.resources.Generator` on top of the translators."""

    def __init__(self, max_resources: int = MAX_RESOURCES) -> None:
        # Across push contexts, by dependencies: outbound clusters and assembled route
        # configurations (Resource), serialized virtual hosts framed as a
        # RouteConfiguration `virtual_hosts` field (bytes).
        self._resources: ResourceCache[Hashable, Resource] = ResourceCache(max_resources)
        self._vhosts: ResourceCache[Hashable, bytes] = ResourceCache(max_resources)
        # A sidecar's own part of CDS and LDS (inbound, fixed), by its scope key and
        # the instances' services: a config change elsewhere does not rebuild it.
        self._own: ResourceCache[Hashable, tuple[Resource, ...]] = ResourceCache(max_resources)
        # Per push context: facts looked up once per context (host fingerprints,
        # VirtualService dependencies), and small interned tokens for long keys.
        self._host_tokens: XdsCache[str, int] = XdsCache()
        self._vs_deps: XdsCache[tuple[Hashable, ...], int] = XdsCache()
        self._vs_source_ns: XdsCache[ConfigKey, bool] = XdsCache()
        self._vs_indexes: XdsCache[str, VirtualServiceIndex] = XdsCache()
        self._mesh_tokens: XdsCache[str, int] = XdsCache()
        self._tokens: dict[Hashable, int] = {}
        self._next_token = itertools.count(1)
        # One cache per kind of entry, each with its typed key (meshpilot/xds/cache.py).
        self._whole: XdsCache[WholeKey, Sequence[Resource]] = XdsCache()
        self._outbound: XdsCache[WholeKey, tuple[Resource, ...]] = XdsCache()
        self._route_scopes: XdsCache[RouteScopeKey, dict[str, Resource]] = XdsCache()
        self._routes_out: XdsCache[RoutesOutKey, tuple[Resource, ...]] = XdsCache()
        self._route_shared: XdsCache[RouteShareKey, Resource] = XdsCache()
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
            "route_shared": self._route_shared,
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
        sizes["vhosts"] = len(self._vhosts)
        sizes["own"] = len(self._own)
        sizes["tokens"] = len(self._tokens)
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
        caches = (self._resources, self._vhosts, self._own)
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
                WholeKey(typeurls.CLUSTER, self._cds_scope(push, proxy, scope), locality),
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
            self._mesh_token(push),
            tuple(self._host_token(push, i.service) for i in push.service_instances(proxy)),
        )

    def _outbound_clusters(self, push: PushContext, proxy: Proxy) -> tuple[Resource, ...]:
        """The scope's outbound clusters, each from the per-resource cache: keyed by the
        service (and what of its endpoints a cluster carries: identities, TLS modes),
        the DestinationRule that applies, mesh settings and SDS; DNS clusters carry
        endpoints ordered for the proxy's locality and are built for the scope."""
        mesh = self._mesh_token(push)
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
                self._host_token(push, spec.service),
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
                WholeKey(typeurls.LISTENER, self._lds_scope(push, proxy, scope), labels),
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
            push.version, scope_key, lambda: self._route_configs(push, proxy, scope_key)
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

    def _route_configs(
        self, push: PushContext, proxy: Proxy, scope_key: RouteScopeKey
    ) -> dict[str, Resource]:
        """Every route configuration of the scope, assembled from cached virtual hosts.

        Built together: they share the scope walk. The bytes are exactly those of the
        RouteConfiguration routes.build_route_configs makes (fields in number order:
        `name` (1), the `virtual_hosts` (2), then the header's other fields)."""
        plans = plan.route_plans(push, proxy)
        scope = push.sidecar_scope(proxy)
        policy = scope.outbound_traffic_policy
        builder = HttpRouteBuilder(push, proxy)
        by_host = scope.services_by_host
        mesh = self._mesh_token(push)
        view = (self._rule_view(push, proxy.namespace), self._visible_view(push, scope))
        vs_index = self._vs_index(push, proxy.namespace)
        labels = scope_key.source_labels
        tail = _route_header_tail()
        # A route configuration whose services all live outside the proxy's namespace
        # has no short (namespace-relative) domains: the same for every namespace that
        # sees the same services and routing (the listeners' view), built once.
        dns_ns, marker, dns_rest = proxy.dns_domain.partition(".svc.")
        own_suffix = f".{dns_ns}.svc.{dns_rest}" if marker else ""
        lds_scope = self._lds_scope(push, proxy, scope_key.scope)
        out: dict[str, Resource] = {}
        for name in sorted(plans):
            share: RouteShareKey | None = None
            if own_suffix and not any(
                s.hostname.endswith(own_suffix) for s in plans[name].http_services
            ):
                share = RouteShareKey(lds_scope, labels, dns_rest, name)
                shared = self._route_shared.get(push.version, share)
                if shared is not None:
                    out[name] = shared
                    continue
            parts = tuple(
                self._vhosts.get_or_build(
                    self._vhost_key(push, proxy, spec, vs_index, view, by_host, labels, mesh),
                    _vhost_builder(spec, builder),
                )
                for spec in routes.virtual_host_specs(plans[name], proxy, policy)
            )
            built = out[name] = self._resources.get_or_build(
                ("rds", name, parts), _route_config_builder(name, parts, tail)
            )
            if share is not None:
                self._route_shared.put(push.version, share, built)
        return out

    def _vhost_key(
        self,
        push: PushContext,
        proxy: Proxy,
        spec: routes.VirtualHostSpec,
        vs_index: VirtualServiceIndex,
        view: Hashable,
        by_host: Mapping[str, Service],
        labels: Hashable,
        mesh: int,
    ) -> Hashable:
        """What one virtual host depends on. Without a VirtualService: the service port,
        its domains (the proxy's DNS domain decides the short ones) and the
        DestinationRule (consistent hashing). With one: its revision, the proxy's
        sourceLabels values (and namespace, for sourceNamespace matches), and the
        destinations' services and rules as the scope sees them (which clusters exist,
        hashing): a token for those, the same in every namespace of the same `view`."""
        svc = spec.service
        if svc is None:
            return ("fallback", spec.fallback, spec.port)
        vs = vs_index.for_host(svc.hostname)
        if vs is None or not vs.spec.http:
            rule = dr_identity(push.destination_rule(proxy.namespace, svc))
            return ("vh", svc.hostname, spec.port, spec.domains, rule, mesh)
        version = push.version
        key = vs.config.key
        if self._vs_source_ns.get_or_build(version, key, lambda: _matches_source_namespace(vs)):
            deps_key: tuple[Hashable, ...] = (key, view, proxy.namespace)
        else:
            deps_key = (key, view)
        deps = self._vs_deps.get_or_build(
            version,
            deps_key,
            lambda: self._intern(self._virtual_service_deps(push, proxy, vs, by_host)),
        )
        return ("vs", svc.hostname, spec.port, spec.domains, deps, labels, mesh)

    def _virtual_service_deps(
        self,
        push: PushContext,
        proxy: Proxy,
        vs: ResolvedVirtualService,
        by_host: Mapping[str, Service],
    ) -> Hashable:
        cfg = vs.config
        dests: list[tuple[str, int | None, Hashable]] = []
        for host in routes.virtual_service_destination_hosts(push, vs):
            svc = by_host.get(host)
            if svc is None:
                dests.append((host, None, None))
            else:
                rule = dr_identity(push.destination_rule(proxy.namespace, svc))
                dests.append((host, self._host_token(push, svc), rule))
        # The proxy's namespace matters to the routes only through `sourceNamespace`
        # matches (the rules that apply to it are in `dests`): otherwise every
        # namespace that sees this VirtualService shares its virtual hosts.
        namespace = proxy.namespace if _matches_source_namespace(vs) else None
        return (cfg.namespace, cfg.name, cfg.revision, namespace, tuple(dests))

    # --- namespaces that see the same -----------------------------------------------------

    def _rule_view(self, push: PushContext, namespace: str) -> str:
        """A name for how DestinationRules look from `namespace`: "" for every namespace
        that has no rules of its own (and is not the root namespace) while every rule is
        exported everywhere; those see the same rule for every host, so what depends on
        the namespace only through rule lookup is shared by all of them."""
        index = push.destination_rules
        if namespace == index.root_namespace or index.by_ns.get(namespace):
            return namespace
        return "" if self._rules_everywhere(push) else namespace

    def _rules_everywhere(self, push: PushContext) -> bool:
        def make() -> int:
            return int(
                all(
                    exported_to(dr.spec.export_to, dr.config.namespace, "")
                    for rules in push.destination_rules.by_ns.values()
                    for dr in rules.values()
                )
            )

        return bool(self._mesh_tokens.get_or_build(push.version, "rules-everywhere", make))

    def _visible_view(self, push: PushContext, scope: SidecarScope) -> Hashable:
        """The scope's key, or one key for every default scope (no Sidecar) while every
        service is exported everywhere: those all see every service."""
        if scope.sidecar is None and self._services_everywhere(push):
            return ("default", "*")
        return scope.key

    def _services_everywhere(self, push: PushContext) -> bool:
        def make() -> int:
            return int(all("*" in svc.export_to for svc in push.services_sorted))

        return bool(self._mesh_tokens.get_or_build(push.version, "services-everywhere", make))

    def _cds_scope(self, push: PushContext, proxy: Proxy, scope: ScopeKey) -> ScopeKey:
        """The key of a scope's outbound clusters: they depend on the visible services
        and the rules that apply to them, not on the namespace as such."""
        sidecar_scope = push.sidecar_scope(proxy)
        view = (self._visible_view(push, sidecar_scope), self._rule_view(push, proxy.namespace))
        # The DNS domain and the proxy's own part do not change clusters either.
        return dataclasses.replace(scope, sidecar_scope=view, instances=(), ips=(), dns_domain="")

    def _lds_scope(self, push: PushContext, proxy: Proxy, scope: ScopeKey) -> ScopeKey:
        """The key of a scope's outbound listeners: visible services, the rules and
        VirtualServices (TCP/TLS routes) that apply to them; not the DNS domain."""
        sidecar_scope = push.sidecar_scope(proxy)
        view = (
            self._visible_view(push, sidecar_scope),
            self._rule_view(push, proxy.namespace),
            self._routing_view(push, proxy.namespace),
        )
        return dataclasses.replace(scope, sidecar_scope=view, instances=(), ips=(), dns_domain="")

    def _vs_index(self, push: PushContext, namespace: str) -> VirtualServiceIndex:
        """The VirtualServices visible from `namespace`: one index for all namespaces
        of the same routing view (it is the same index)."""
        view = self._routing_view(push, namespace)
        if view:
            return push.virtual_services(namespace)
        return self._vs_indexes.get_or_build(
            push.version, "", lambda: push.virtual_services(namespace)
        )

    def _routing_view(self, push: PushContext, namespace: str) -> str:
        """ "" for every namespace while each VirtualService is exported everywhere and
        none matches on sourceNamespace: they all see the same routing; else the
        namespace."""

        def make() -> int:
            for vs in push.virtual_services_all:
                if not exported_to(vs.spec.export_to, vs.config.namespace, ""):
                    return 0
                spec = vs.spec
                if (
                    any(m.source_namespace for r in spec.http for m in r.match)
                    or any(m.source_namespace for t in spec.tcp for m in t.match)
                    or any(m.source_namespace for s in spec.tls for m in s.match)
                ):
                    return 0
            return 1

        everywhere = self._mesh_tokens.get_or_build(push.version, "routing-everywhere", make)
        return "" if everywhere else namespace

    def _host_token(self, push: PushContext, svc: Service) -> int:
        """A token for everything an outbound cluster takes from its service: the
        service itself, its endpoints' identities and TLS modes (auto mTLS) and the
        mTLS mode of its namespace. Equal content, equal token, in any push context."""

        def make() -> int:
            modes = tuple(
                (port, frozenset(ep.tls_mode for ep in eps))
                for port, eps in sorted(push.endpoints.get(svc.hostname, {}).items())
            )
            return self._intern(
                (
                    svc.hostname,
                    svc.namespace,
                    svc.name,
                    svc.ports,
                    svc.resolution,
                    svc.addresses,
                    svc.mesh_external,
                    svc.source,
                    push.service_identities(svc),
                    modes,
                    push.security.namespace_mtls_mode(svc.namespace),
                )
            )

        return self._host_tokens.get_or_build(push.version, svc.hostname, make)

    def _mesh_token(self, push: PushContext) -> int:
        return self._mesh_tokens.get_or_build(
            push.version, "", lambda: self._intern(push.mesh.model_dump_json())
        )

    def _intern(self, fingerprint: Hashable) -> int:
        token = self._tokens.get(fingerprint)
        if token is None:
            if len(self._tokens) >= _MAX_TOKENS:
                # Fresh tokens from here on: old keys then miss, never match wrongly.
                self._tokens.clear()
            token = self._tokens[fingerprint] = next(self._next_token)
        return token

    def _source_labels(self, push: PushContext, proxy: Proxy) -> Hashable:
        """The proxy's values of labels VirtualService sourceLabels look at (routes and
        TCP listeners differ by them); the label names are found once per namespace,
        or once for all namespaces that see the same VirtualServices."""
        names = self._label_names.get_or_build(
            push.version,
            NamespaceKey(self._routing_view(push, proxy.namespace)),
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
        view = EdsViewKey(self._rule_view(push, proxy.namespace), proxy.locality)
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
_MAX_TOKENS = 200_000


def _outbound_only(scope: ScopeKey) -> ScopeKey:
    """The scope key without the proxy's own part: what outbound output depends on."""
    if not scope.instances and not scope.ips:
        return scope
    return dataclasses.replace(scope, instances=(), ips=())


def _matches_source_namespace(vs: ResolvedVirtualService) -> bool:
    return any(m.source_namespace for rule in vs.spec.http for m in rule.match)


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


def _vhost_builder(spec: routes.VirtualHostSpec, builder: HttpRouteBuilder) -> Callable[[], bytes]:
    return lambda: wire.field(
        2, routes.build_virtual_host(spec, builder).SerializeToString(deterministic=True)
    )


def _route_config_builder(
    name: str, vhosts: tuple[bytes, ...], tail: bytes
) -> Callable[[], Resource]:
    # Fields in number order, as protobuf writes them: name (1), virtual_hosts (2),
    # then the rest of the header.
    return lambda: Resource.of_bytes(
        name, wire.string_field(1, name) + b"".join(vhosts) + tail, typeurls.ROUTE
    )


_TAIL: list[bytes] = []


def _route_header_tail() -> bytes:
    """The header fields of an outbound RouteConfiguration after `virtual_hosts`."""
    if not _TAIL:
        _TAIL.append(routes.route_config_header("").SerializeToString(deterministic=True))
    return _TAIL[0]


def _cluster_host(cluster_name: str) -> str:
    parsed = naming.parse_cluster_name(cluster_name)
    return parsed[3] if parsed else ""


def _resource(message: Message, type_url: str) -> Resource:
    name = message.cluster_name if type_url == typeurls.ENDPOINT else message.name  # type: ignore[attr-defined]
    return Resource.of(name, message, type_url)
