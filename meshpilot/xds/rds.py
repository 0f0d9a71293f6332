"""RDS assembly: outbound route configurations from cached serialized virtual hosts.

Istio caches a route configuration as a whole, keyed by the configs of all its virtual
hosts. Here each virtual host is serialized once, keyed by exactly what it depends on,
and a route configuration is assembled at the wire level: a repeated field's encoding
is the concatenation of its elements' (RouteConfiguration `name` (1), `virtual_hosts`
(2), then the other header fields, as protobuf writes them), so the bytes equal those
of the message routes.build_route_configs builds. A VirtualService change rebuilds
only its hosts' virtual hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping

from meshpilot.config import ConfigKey
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.routing import ResolvedVirtualService, VirtualServiceIndex
from meshpilot.model.service import Service
from meshpilot.translators import plan, routes
from meshpilot.translators.http_route import HttpRouteBuilder
from meshpilot.translators.traffic_policy import dr_identity
from meshpilot.xds import typeurls, wire
from meshpilot.xds.cache import ResourceCache, RouteScopeKey, RouteShareKey, XdsCache
from meshpilot.xds.resources import Resource
from meshpilot.xds.views import MeshViews


class RouteAssembler:
    """Route configurations of a scope; `resources` is the generator's per-resource
    cache (assembled configurations are kept there, by their virtual hosts)."""

    def __init__(
        self, views: MeshViews, resources: ResourceCache[Hashable, Resource], max_vhosts: int
    ) -> None:
        self._views = views
        self._resources = resources
        # Serialized virtual hosts framed as a RouteConfiguration `virtual_hosts` field.
        self.vhosts: ResourceCache[Hashable, bytes] = ResourceCache(max_vhosts)
        # Per push context: configurations shared by namespaces of one view, and
        # VirtualService dependencies.
        self.shared: XdsCache[RouteShareKey, Resource] = XdsCache()
        self._vs_deps: XdsCache[tuple[Hashable, ...], int] = XdsCache()
        self._vs_source_ns: XdsCache[ConfigKey, bool] = XdsCache()

    def route_configs(
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
        mesh = self._views.mesh_token(push)
        view = (self._views.rule_view(push, proxy.namespace), self._views.visible_view(push, scope))
        vs_index = self._views.vs_index(push, proxy.namespace)
        labels = scope_key.source_labels
        tail = _route_header_tail()
        # A route configuration whose services all live outside the proxy's namespace
        # has no short (namespace-relative) domains: the same for every namespace that
        # sees the same services and routing (the listeners' view), built once.
        dns_ns, marker, dns_rest = proxy.dns_domain.partition(".svc.")
        own_suffix = f".{dns_ns}.svc.{dns_rest}" if marker else ""
        lds_scope = self._views.lds_scope(push, proxy, scope_key.scope)
        out: dict[str, Resource] = {}
        for name in sorted(plans):
            share: RouteShareKey | None = None
            if own_suffix and not any(
                s.hostname.endswith(own_suffix) for s in plans[name].http_services
            ):
                share = RouteShareKey(lds_scope, labels, dns_rest, name)
                shared = self.shared.get(push.version, share)
                if shared is not None:
                    out[name] = shared
                    continue
            parts = tuple(
                self.vhosts.get_or_build(
                    self._vhost_key(push, proxy, spec, vs_index, view, by_host, labels, mesh),
                    _vhost_builder(spec, builder),
                )
                for spec in routes.virtual_host_specs(plans[name], proxy, policy)
            )
            built = out[name] = self._resources.get_or_build(
                ("rds", name, parts), _route_config_builder(name, parts, tail)
            )
            if share is not None:
                self.shared.put(push.version, share, built)
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
            lambda: self._views.intern(self._virtual_service_deps(push, proxy, vs, by_host)),
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
                dests.append((host, self._views.host_token(push, svc), rule))
        # The proxy's namespace matters to the routes only through `sourceNamespace`
        # matches (the rules that apply to it are in `dests`): otherwise every
        # namespace that sees this VirtualService shares its virtual hosts.
        namespace = proxy.namespace if _matches_source_namespace(vs) else None
        return (cfg.namespace, cfg.name, cfg.revision, namespace, tuple(dests))


def _matches_source_namespace(vs: ResolvedVirtualService) -> bool:
    return any(m.source_namespace for rule in vs.spec.http for m in rule.match)


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
