"""The bridge from push contexts to xDS resources: calls translators, caches by scope.

The server asks for a type; this decides what that proxy gets, generating each scope's
output once per push context and serializing each resource once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

from google.protobuf.message import Message

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.translators import clusters, endpoints, listeners, naming, routes, tls
from meshpilot.xds import typeurls
from meshpilot.xds.cache import XdsCache
from meshpilot.xds.resources import Generated, Resource


class ConfigGenerator:
    """Implements `meshpilot.xds.resources.Generator` on top of the translators."""

    def __init__(self) -> None:
        self.cache = XdsCache()
        # Cluster name -> host and back, for incremental EDS pushes.
        self._host_of: dict[str, str] = {}
        self._names_by_host: dict[str, set[str]] = {}

    # --- scope keys: proxies with equal keys get identical output --------------------

    @staticmethod
    def _proxy_scope(push: PushContext, proxy: Proxy) -> Hashable:
        scope = push.sidecar_scope(proxy)
        instances = tuple(
            (i.service.hostname, i.port.port, i.endpoint_port)
            for i in push.service_instances(proxy)
        )
        # Ingress listeners bind to (and default endpoints point at) the proxy's own IP;
        # otherwise only the IP family matters (DNS lookup family, passthrough source).
        ip = proxy.ip_addresses if (scope.ingress or instances) else ()
        families = tuple(":" in a for a in proxy.ip_addresses)
        return (
            proxy.type,
            scope.key,
            instances,
            ip,
            families,
            proxy.interception_mode,
            proxy.dns_domain,
            # Mesh mTLS (SDS references) only for proxies beside the agent.
            tls.proxy_has_sds(proxy),
        )

    # --- Generator ----------------------------------------------------------------------

    def generate(
        self,
        type_url: str,
        proxy: Proxy,
        push: PushContext,  # type: ignore[override]
        names: frozenset[str] | None,
        request: PushRequest | None,
    ) -> Generated | None:
        incremental = request is not None and not request.full
        if type_url == typeurls.ENDPOINT:
            return self._endpoints(push, proxy, names, request if incremental else None)
        if incremental:
            return None
        if type_url == typeurls.CLUSTER:
            return self._whole(
                push,
                proxy,
                "cds",
                type_url,
                clusters.build_clusters,
                extra=self._cds_locality(push, proxy),
            )
        if type_url == typeurls.LISTENER:
            return self._whole(
                push,
                proxy,
                "lds",
                type_url,
                listeners.build_listeners,
                extra=(self._source_labels(push, proxy), self._inbound_security(push, proxy)),
            )
        if type_url == typeurls.ROUTE:
            return self._routes(push, proxy, names)
        return None

    def _whole(
        self,
        push: PushContext,
        proxy: Proxy,
        tag: str,
        type_url: str,
        build: Callable[[PushContext, Proxy], Sequence[Message]],
        extra: Hashable = None,
    ) -> Generated:
        scope = self._proxy_scope(push, proxy)
        key = (tag, scope) if extra is None else (tag, scope, extra)

        def make() -> tuple[Resource, ...]:
            return tuple(_resource(m, type_url) for m in build(push, proxy))

        return Generated(self.cache.get_or_build(push.version, key, make), complete=True)

    def _routes(self, push: PushContext, proxy: Proxy, names: frozenset[str] | None) -> Generated:
        scope_key = ("rds", self._proxy_scope(push, proxy), self._source_labels(push, proxy))
        wanted = sorted(names) if names is not None else routes.route_names_for(push, proxy)

        def make_all() -> dict[str, Resource]:
            # Route configs of one scope are built together: they share the scope walk.
            built = routes.build_route_configs(push, proxy, None)
            return {rc.name: _resource(rc, typeurls.ROUTE) for rc in built}

        # One shared answer per scope and subscription: the server then frames (and may
        # send) the same bytes to every proxy of the scope.
        out_key = ("rds-out", scope_key, names)
        shared = self.cache.get(push.version, out_key)
        if shared is not None:
            return Generated(shared, complete=True)  # type: ignore[arg-type]
        by_name = self.cache.get_or_build(push.version, scope_key, make_all)
        out: list[Resource] = []
        for name in wanted:
            res = by_name.get(name)
            if res is None:
                # A name the scope does not produce still gets an answer (empty config),
                # cached per name so it is serialized once.
                res = self.cache.get_or_build(
                    push.version,
                    ("rds-extra", scope_key, name),
                    lambda n=name: _resource(
                        routes.build_route_configs(push, proxy, [n])[0], typeurls.ROUTE
                    ),
                )
            out.append(res)
        result = self.cache.get_or_build(push.version, out_key, lambda: tuple(out))
        return Generated(result, complete=True)

    def _source_labels(self, push: PushContext, proxy: Proxy) -> Hashable:
        """The proxy's values of labels VirtualService sourceLabels look at (routes and
        TCP listeners differ by them); the label names are found once per namespace."""
        names = self.cache.get_or_build(
            push.version,
            ("source-label-names", proxy.namespace),
            lambda: routes.source_label_names(push, proxy.namespace),
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
        depends = self.cache.get_or_build(
            push.version,
            ("cds-locality", self._proxy_scope(push, proxy), proxy.namespace),
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
        shared_key = ("eds-out", proxy.namespace, proxy.locality, names, hosts)
        shared = self.cache.get(push.version, shared_key)
        if shared is not None:
            return Generated(shared, complete=request is None)  # type: ignore[arg-type]
        wanted: Iterable[str] = names
        if hosts is not None:
            # Walk the few changed hosts, not the proxy's (possibly thousands of) names:
            # this runs once per connected proxy on every endpoint change.
            by_host = self._names_by_host
            wanted = [n for h in hosts for n in by_host.get(h, ()) if n in names]
            if not wanted:
                return None
        else:
            self._index_names(names)
        # Cache keys depend on the proxy's namespace and locality (and rarely its labels):
        # memoized per push for each such pair, so a proxy whose assignments are all
        # built already costs a dict lookup per name.
        memo: dict[str, Hashable] = self.cache.get_or_build(
            push.version, ("eds-keys", proxy.namespace, proxy.locality), dict
        )
        ordered = sorted(wanted)
        out = tuple(self._load_assignment(push, proxy, name, memo) for name in ordered)
        if all(n in memo for n in ordered):
            # No assignment depends on this proxy's labels: share it (see above).
            out = self.cache.get_or_build(push.version, shared_key, lambda: out)
        return Generated(out, complete=request is None)

    def _load_assignment(
        self, push: PushContext, proxy: Proxy, cluster_name: str, memo: dict[str, Hashable]
    ) -> Resource:
        # Keyed per cluster and, only where DestinationRule subsets or locality make the
        # assignment proxy-dependent, per rule and locality: proxies share the rest.
        key = memo.get(cluster_name)
        if key is not None:
            return self.cache.get_or_build(
                push.version,
                key,
                lambda: _resource(
                    endpoints.build_load_assignment(push, proxy, cluster_name), typeurls.ENDPOINT
                ),
            )
        key, build = endpoints.eds_cache_entry(push, proxy, cluster_name)
        if not endpoints.key_uses_proxy_labels(key):
            memo[cluster_name] = key
        return self.cache.get_or_build(
            push.version, key, lambda: _resource(build(), typeurls.ENDPOINT)
        )

    def _index_names(self, names: Iterable[str]) -> None:
        """Remember the host of each subscribed cluster name (parsed once per name)."""
        host_of = self._host_of
        for name in names:
            if name not in host_of:
                if len(host_of) > _MAX_INDEXED_NAMES:
                    host_of.clear()
                    self._names_by_host.clear()
                host = host_of[name] = _cluster_host(name)
                self._names_by_host.setdefault(host, set()).add(name)

    def on_new_context(self, previous: PushContext | None, current: PushContext) -> None:
        """Carry unchanged ClusterLoadAssignments over to an endpoint-only context."""
        if previous is None or current.changed_hosts is None:
            return
        changed = current.changed_hosts

        def keep(key: Hashable) -> bool:
            # EDS keys are ("eds", cluster_name, ...): the host is in the cluster name.
            return (
                isinstance(key, tuple)
                and len(key) > 1
                and key[0] == "eds"
                and (self._host_of.get(key[1]) or _cluster_host(key[1])) not in changed
            )

        self.cache.carry_over(previous.version, current.version, keep)


_MAX_INDEXED_NAMES = 500_000


def _cluster_host(cluster_name: str) -> str:
    parsed = naming.parse_cluster_name(cluster_name)
    return parsed[3] if parsed else ""


def _resource(message: Message, type_url: str) -> Resource:
    name = message.cluster_name if type_url == typeurls.ENDPOINT else message.name  # type: ignore[attr-defined]
    return Resource.of(name, message, type_url)
