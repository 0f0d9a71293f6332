"""VirtualService `http` rules to the routes of a sidecar's outbound virtual host.

Istio's BuildHTTPRoutesForVirtualService and translateRoute: each rule times each of
its matches (no match: one catch-all route), in order, stopping after a catch-all.
Matches decided at generation time (listener port, source labels and namespace,
gateways) drop routes here. When a VirtualService yields routes, they are all the
virtual host has: unmatched requests get 404, as in Istio. When it yields none on a
port, the service keeps its default route.

A destination whose cluster the proxy was not sent (unknown host, port or subset)
keeps its weight in a split, as in Istio: that share of requests gets Envoy's 503 NC
(`cluster_not_found`; route configs set `validate_clusters: false`, so Envoy accepts
them). Unlike Istio, a rule whose every destination is missing (one destination, or
all of a split) answers 503 with a body naming the missing clusters.

Consistent hashing comes from the DestinationRule of each destination
(traffic_policy.hash_policies); a single-destination route that hashes retries on
the same host, as Istio's DefaultConsistentHashPolicy.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from google.protobuf import struct_pb2

from meshpilot.api.networking import Destination, HTTPMatchRequest, HTTPRoute
from meshpilot.config import Config
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.routing import ResolvedVirtualService
from meshpilot.model.service import Service
from meshpilot.translators import naming, traffic_policy
from meshpilot.translators import route_policies as rp
from meshpilot.translators.common import bool_value, duration, pack
from meshpilot.translators.destinations import ClusterSet, ResolvedDestination, static_match

FAULT_FILTER = "envoy.filters.http.fault"
CORS_FILTER = "envoy.filters.http.cors"
NO_CLUSTER_STATUS = 503
# Istio raises Envoy's 4 KiB limit so that VirtualService direct responses fit.
MAX_DIRECT_RESPONSE_BODY_BYTES = 1024 * 1024


def config_metadata(cfg: Config) -> base_pb2.Metadata:
    """`istio.config`, the object a route came from, as Istio shows it in config dumps."""
    path = f"/apis/networking.istio.io/v1/namespaces/{cfg.namespace}/virtual-service/{cfg.name}"
    istio = struct_pb2.Struct()
    istio.update({"config": path})
    md = base_pb2.Metadata()
    md.filter_metadata["istio"].CopyFrom(istio)
    return md


class HttpRouteBuilder:
    """Routes for one proxy's outbound route configurations, cached per (VS, port)."""

    def __init__(self, push: PushContext, proxy: Proxy, clusters: ClusterSet | None = None) -> None:
        self.push = push
        self.proxy = proxy
        self.clusters = clusters or ClusterSet(push, proxy)
        self._cache: dict[tuple[object, int], list[rc.Route]] = {}

    # --- entry points ---------------------------------------------------------------------

    def service_routes(self, svc: Service, port: int) -> list[rc.Route]:
        """The routes of `svc`'s virtual host on listener `port`."""
        vs = self.push.virtual_service_for(self.proxy.namespace, svc.hostname)
        if vs is not None and vs.spec.http:
            routes = self.virtual_service_routes(vs, port)
            if routes:
                return routes
        return [self.default_route(svc, port)]

    def virtual_service_routes(self, vs: ResolvedVirtualService, port: int) -> list[rc.Route]:
        key = (vs.config.key, port)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._build(vs, port)
        return cached

    def default_route(self, svc: Service, port: int) -> rc.Route:
        """Istio's route for a service without VirtualService: all to `outbound|PORT||HOST`."""
        cluster = naming.outbound_cluster_name(port, "", svc.hostname)
        hashes = self._hash_policies(svc, "", port)
        action = rc.RouteAction(cluster=cluster, hash_policy=hashes)
        _set_timeout(action, None)
        retry = rp.retry_policy(None, consistent_hash=bool(hashes))
        assert retry is not None
        action.retry_policy.CopyFrom(retry)
        return rc.Route(
            name=naming.DEFAULT_ROUTE,
            match=rc.RouteMatch(prefix="/"),
            route=action,
            decorator=rc.Decorator(operation=f"{svc.hostname}:{port}/*"),
        )

    # --- one VirtualService -----------------------------------------------------------------

    def _build(self, vs: ResolvedVirtualService, port: int) -> list[rc.Route]:
        out: list[rc.Route] = []
        metadata = config_metadata(vs.config)
        for rule in vs.spec.http:
            if rule.delegate is not None:
                continue  # delegation is not supported; analysis reports it
            if not rule.match:
                route = self._route(vs, rule, None, port, metadata)
                if route is not None:
                    out.append(route)
                break  # a rule without match catches everything; later rules never run
            catch_all = False
            for match in rule.match:
                if not static_match(
                    self.proxy,
                    port=match.port,
                    listener_port=port,
                    source_labels=match.source_labels,
                    source_namespace=match.source_namespace,
                    gateways=match.gateways,
                ):
                    continue
                route = self._route(vs, rule, match, port, metadata)
                if route is None:
                    continue
                out.append(route)
                if rp.is_catch_all(route.match):
                    catch_all = True
                    break
            if catch_all:
                break
        return out

    def _route(
        self,
        vs: ResolvedVirtualService,
        rule: HTTPRoute,
        match: HTTPMatchRequest | None,
        port: int,
        metadata: base_pb2.Metadata,
    ) -> rc.Route | None:
        name = rule.name
        if match is not None and match.name:
            name = f"{name}.{match.name}"
        out = rc.Route(name=name, match=rp.route_match(match))
        out.metadata.CopyFrom(metadata)
        if match is not None and match.stat_prefix:
            out.stat_prefix = match.stat_prefix
        authority = ""
        if rule.headers is not None:
            ops = rp.header_ops(rule.headers)
            out.request_headers_to_add.extend(ops.request_add)
            out.request_headers_to_remove.extend(ops.request_remove)
            out.response_headers_to_add.extend(ops.response_add)
            out.response_headers_to_remove.extend(ops.response_remove)
            authority = ops.authority
        if rule.redirect is not None:
            redirect = rp.redirect_action(rule.redirect, port)
            if redirect is None:
                return None  # a redirect code Envoy cannot send; analysis reports it
            out.redirect.CopyFrom(redirect)
        elif rule.direct_response is not None:
            out.direct_response.CopyFrom(rp.direct_response(rule.direct_response))
        else:
            self._route_action(out, vs, rule, port, authority)
        out.decorator.operation = _operation(out, vs.config.name, port)
        if rule.fault is not None:
            fault = rp.http_fault(rule.fault)
            if fault is not None:
                out.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(fault))
        if rule.cors_policy is not None:
            out.typed_per_filter_config[CORS_FILTER].CopyFrom(
                pack(rp.cors_policy(rule.cors_policy))
            )
        return out

    def _route_action(
        self,
        out: rc.Route,
        vs: ResolvedVirtualService,
        rule: HTTPRoute,
        port: int,
        authority: str,
    ) -> None:
        action = rc.RouteAction()
        _set_timeout(action, rule.timeout)
        if rule.rewrite is not None:
            if rule.rewrite.uri_regex_rewrite is not None:
                action.regex_rewrite.pattern.regex = rule.rewrite.uri_regex_rewrite.match
                action.regex_rewrite.substitution = rule.rewrite.uri_regex_rewrite.rewrite
            elif rule.rewrite.uri:
                # Istio: the matched prefix, or the whole path of an exact or regex
                # match (Envoy's prefix_rewrite replaces what the match consumed).
                action.prefix_rewrite = rule.rewrite.uri
            if rule.rewrite.authority:
                authority = rule.rewrite.authority
        if authority:
            action.host_rewrite_literal = authority
        self._mirrors(action, vs, rule, port)
        ns = vs.config.namespace
        consistent_hash = False
        if len(rule.route) == 1:
            rd = rule.route[0]
            dest = self.clusters.resolve(ns, rd.destination, port)
            if not self.clusters.has(dest.cluster):
                _no_cluster(out, [dest.cluster])
                return
            action.cluster = dest.cluster
            if rd.headers is not None:
                ops = rp.header_ops(rd.headers)
                out.request_headers_to_add.extend(ops.request_add)
                out.request_headers_to_remove.extend(ops.request_remove)
                out.response_headers_to_add.extend(ops.response_add)
                out.response_headers_to_remove.extend(ops.response_remove)
                if ops.authority and not action.HasField("host_rewrite_literal"):
                    action.host_rewrite_literal = ops.authority
            hashes = self._destination_hashes(dest)
            action.hash_policy.extend(hashes)
            consistent_hash = bool(hashes)
        else:
            missing: list[str] = []
            for rd in rule.route:
                if rd.weight == 0:
                    continue  # Istio ignores zero weights when there are several
                dest = self.clusters.resolve(ns, rd.destination, port)
                known = self.clusters.has(dest.cluster)
                if not known:
                    missing.append(dest.cluster)
                # A missing cluster keeps its weight, as in Istio: its share of requests
                # gets Envoy's 503 NC (cluster_not_found) instead of going to the others.
                cw = rc.WeightedCluster.ClusterWeight(name=dest.cluster)
                cw.weight.value = rd.weight
                if rd.headers is not None:
                    ops = rp.header_ops(rd.headers)
                    cw.request_headers_to_add.extend(ops.request_add)
                    cw.request_headers_to_remove.extend(ops.request_remove)
                    cw.response_headers_to_add.extend(ops.response_add)
                    cw.response_headers_to_remove.extend(ops.response_remove)
                    if ops.authority:
                        cw.host_rewrite_literal = ops.authority
                action.weighted_clusters.clusters.append(cw)
                if not known:
                    continue
                for h in self._destination_hashes(dest):
                    if h not in action.hash_policy:
                        action.hash_policy.append(h)
            if len(missing) == len(action.weighted_clusters.clusters):
                # All weights zero (Envoy would reject the split) or all clusters missing:
                # every request gets 503, so say which clusters, as for one destination.
                _no_cluster(out, missing)
                return
        retry = rp.retry_policy(rule.retries, consistent_hash)
        if retry is not None:
            action.retry_policy.CopyFrom(retry)
        out.route.CopyFrom(action)

    def _mirrors(
        self, action: rc.RouteAction, vs: ResolvedVirtualService, rule: HTTPRoute, port: int
    ) -> None:
        targets: list[tuple[Destination, base_pb2.RuntimeFractionalPercent | None]] = []
        if rule.mirror is not None:
            targets.append(
                (rule.mirror, rp.mirror_fraction(rule.mirror_percentage, rule.mirror_percent))
            )
        for m in rule.mirrors:
            targets.append((m.destination, rp.mirror_fraction(m.percentage, None)))
        for dest_spec, fraction in targets:
            if fraction is None:
                continue  # an explicit 0% mirrors nothing
            dest = self.clusters.resolve(vs.config.namespace, dest_spec, port)
            if not self.clusters.has(dest.cluster):
                continue  # mirroring is best effort; analysis reports the reference
            action.request_mirror_policies.append(
                rc.RouteAction.RequestMirrorPolicy(
                    cluster=dest.cluster, runtime_fraction=fraction, trace_sampled=bool_value(False)
                )
            )

    # --- consistent hashing -----------------------------------------------------------------

    def _destination_hashes(self, dest: ResolvedDestination) -> list[rc.RouteAction.HashPolicy]:
        if dest.service is None:
            return []
        return self._hash_policies(dest.service, dest.subset, dest.port)

    def _hash_policies(
        self, svc: Service, subset: str, port: int
    ) -> list[rc.RouteAction.HashPolicy]:
        return traffic_policy.hash_policies(self.push, self.proxy, svc, subset, port)


def _set_timeout(action: rc.RouteAction, timeout: float | None) -> None:
    """The VirtualService timeout, else none (0s: Envoy's 15 s default would cut long
    requests that work without a mesh).

    Istio also sets the deprecated `max_grpc_timeout`; its replacement
    `max_stream_duration` must stay unset: any value there switches Envoy to "new
    timeouts" and the route `timeout` is ignored.
    """
    action.timeout.CopyFrom(duration(timeout or 0))


def _no_cluster(out: rc.Route, clusters: list[str]) -> None:
    body = "no destination for this route"
    if clusters:
        body = "unknown destination cluster " + ", ".join(clusters)
    out.direct_response.status = NO_CLUSTER_STATUS
    out.direct_response.body.inline_string = f"meshpilot: {body}\n"


def _operation(route: rc.Route, vs_name: str, port: int) -> str:
    """Istio's GetRouteOperation: `host:port/path` for one cluster, else the VS name."""
    m = route.match
    which = m.WhichOneof("path_specifier")
    path = "/*"
    if which == "prefix":
        path = m.prefix + "*"
    elif which == "path":
        path = m.path
    elif which == "safe_regex":
        path = m.safe_regex.regex
    if route.WhichOneof("action") == "route" and route.route.cluster:
        parsed = naming.parse_cluster_name(route.route.cluster)
        if parsed is not None:
            return f"{parsed[3]}:{parsed[1]}{path}"
    return f"{vs_name}:{port}{path}"
