"""The bridge from push contexts to xDS resources: calls translators, caches by scope.

The server asks for a type; this decides what that proxy gets, generating each scope's
output once per push context and serializing each resource once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from google.protobuf.message import Message

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.translators import clusters, endpoints, listeners, naming, routes, tls
from meshpilot.xds import typeurls
from meshpilot.xds.cache import (
    EdsKey,
    EdsOutKey,
    EdsViewKey,
    NamespaceKey,
    RouteScopeKey,
    RoutesOutKey,
    ScopeKey,
    ScopeNamespaceKey,
    WholeKey,
    XdsCache,
)
from meshpilot.xds.resources import Generated, Resource


class ConfigGenerator:
    """Implements `meshpilot.xds.resources.Generator` on top of the translators."""

    def __init__(self) -> None:
        # One cache per kind of entry, each with its typed key (meshpilot/xds/cache.py).
        self._whole: XdsCache[WholeKey, tuple[Resource, ...]] = XdsCache()
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
            "route_scopes": self._route_scopes,
            "routes_out": self._routes_out,
            "label_names": self._label_names,
            "cds_locality": self._cds_locality_of,
            "eds": self._eds,
            "eds_out": self._eds_out,
            "eds_keys": self._eds_keys,
        }

    def table_sizes(self) -> dict[str, int]:
        """Entries in each cache and index, for tests and debugging."""
        sizes = {name: len(cache) for name, cache in self._caches().items()}
        sizes["host_of"] = len(self._host_of)
        sizes["names_by_host"] = sum(len(v) for v in self._names_by_host.values())
        return sizes

    def cache_stats(self) -> tuple[int, int]:
        """(hits, misses) over every cache."""
        caches = self._caches().values()
        return sum(c.hits for c in caches), sum(c.misses for c in caches)

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
            return self._whole_answer(
                push,
                proxy,
                type_url,
                clusters.build_clusters,
                extra=self._cds_locality(push, proxy),
            )
        if type_url == typeurls.LISTENER:
            return self._whole_answer(
                push,
                proxy,
                type_url,
                listeners.build_listeners,
                extra=(self._source_labels(push, proxy), self._inbound_security(push, proxy)),
            )
        if type_url == typeurls.ROUTE:
            return self._routes(push, proxy, names)
        return None

    def _whole_answer(
        self,
        push: PushContext,
        proxy: Proxy,
        type_url: str,
        build: Callable[[PushContext, Proxy], Sequence[Message]],
        extra: Hashable = None,
    ) -> Generated:
        key = WholeKey(type_url, self._proxy_scope(push, proxy), extra)

        def make() -> tuple[Resource, ...]:
            return tuple(_resource(m, type_url) for m in build(push, proxy))

        return Generated(self._whole.get_or_build(push.version, key, make), complete=True)

    def _routes(self, push: PushContext, proxy: Proxy, names: frozenset[str] | None) -> Generated:
        scope_key = RouteScopeKey(self._proxy_scope(push, proxy), self._source_labels(push, proxy))
        # One shared answer per scope and subscription: the server then frames (and may
        # send) the same bytes to every proxy of the scope.
        out_key = RoutesOutKey(scope_key, names)
        shared = self._routes_out.get(push.version, out_key)
        if shared is not None:
            return Generated(shared, complete=True)
        wanted = sorted(names) if names is not None else routes.route_names_for(push, proxy)

        def make_all() -> dict[str, Resource]:
            # Route configs of one scope are built together: they share the scope walk.
            built = routes.build_route_configs(push, proxy, None)
            return {rc.name: _resource(rc, typeurls.ROUTE) for rc in built}

        by_name = self._route_scopes.get_or_build(push.version, scope_key, make_all)
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
        TCP listeners differ by them); the label names are found once per namespace."""
        names = self._label_names.get_or_build(
            push.version,
            NamespaceKey(proxy.namespace),
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
        view = EdsViewKey(proxy.namespace, proxy.locality)
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
        """Carry unchanged ClusterLoadAssignments over to an endpoint-only context."""
        if previous is None or current.changed_hosts is None:
            return
        changed = current.changed_hosts

        def keep(key: EdsKey) -> bool:
            name = key.cluster_name
            return (self._host_of.get(name) or _cluster_host(name)) not in changed

        self._eds.carry_over(previous.version, current.version, keep)


_MAX_INDEXED_NAMES = 500_000


def _cluster_host(cluster_name: str) -> str:
    parsed = naming.parse_cluster_name(cluster_name)
    return parsed[3] if parsed else ""


def _resource(message: Message, type_url: str) -> Resource:
    name = message.cluster_name if type_url == typeurls.ENDPOINT else message.name  # type: ignore[attr-defined]
    return Resource.of(name, message, type_url)
