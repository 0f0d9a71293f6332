"""VirtualService `tcp` and `tls` rules for a sidecar's outbound TCP/TLS filter chains.

Istio's buildSidecarOutboundTCPFilterChainOpts / ...TLSFilterChainOpts: for a TCP
port, the first `tcp` rule that has no match, or a match whose static predicates
(port, source labels and namespace, gateways) hold, decides where connections go;
for a TLS/HTTPS port, each matching `tls` match becomes a chain on its SNI hosts.
One destination gives `cluster`; several give `weighted_clusters` (zero weights
left out). Destinations the proxy has no cluster for are left out too, and with
nothing left the connection goes to BlackHoleCluster instead of a missing cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshpilot.api.networking import RouteDestination
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.routing import ResolvedVirtualService
from meshpilot.model.service import Service
from meshpilot.translators import naming, traffic_policy
from meshpilot.translators.destinations import ClusterSet, ResolvedDestination, static_match


@dataclass(frozen=True, slots=True)
class TcpSettings:
    """tcp_proxy settings from the DestinationRule of the destination (Istio's
    buildOutboundNetworkFiltersWithSingleDestination and maybeSetHashPolicy)."""

    idle_timeout: float | None = None
    max_connection_duration: float | None = None
    hash_source_ip: bool = False


NO_TCP_SETTINGS = TcpSettings()


@dataclass(frozen=True, slots=True)
class L4Target:
    """Where a tcp_proxy sends connections: one cluster, or weighted clusters."""

    cluster: str
    weighted: tuple[tuple[str, int], ...] = ()
    stat_prefix: str = ""
    settings: TcpSettings = NO_TCP_SETTINGS

    @staticmethod
    def single(cluster: str, settings: TcpSettings = NO_TCP_SETTINGS) -> L4Target:
        return L4Target(cluster, (), cluster, settings)


@dataclass(frozen=True, slots=True)
class TlsRoute:
    """One `tls` match: SNI names (empty: any) and where they go."""

    server_names: tuple[str, ...]
    target: L4Target


class L4Routes:
    """TCP and TLS VirtualService routing for one proxy; cheap when no VS applies."""

    def __init__(self, push: PushContext, proxy: Proxy) -> None:
        self.push = push
        self.proxy = proxy
        self.clusters = ClusterSet(push, proxy)

    def tcp_settings(self, svc: Service | None, subset: str, port: int) -> TcpSettings:
        """Idle timeout, connection duration and source-IP hashing for a tcp_proxy to
        `outbound|port|subset|svc`, from the policy its cluster gets."""
        if svc is None:
            return NO_TCP_SETTINGS
        dr = self.push.destination_rule(self.proxy.namespace, svc)
        if dr is None:
            return NO_TCP_SETTINGS
        policy = traffic_policy.policy_for(dr, subset, port)
        pool = policy.connection_pool.tcp if policy.connection_pool is not None else None
        lb = policy.load_balancer
        settings = TcpSettings(
            pool.idle_timeout if pool is not None else None,
            pool.max_connection_duration if pool is not None else None,
            bool(lb and lb.consistent_hash and lb.consistent_hash.use_source_ip),
        )
        return NO_TCP_SETTINGS if settings == NO_TCP_SETTINGS else settings

    def _vs(self, svc: Service) -> ResolvedVirtualService | None:
        return self.push.virtual_service_for(self.proxy.namespace, svc.hostname)

    def tcp_target(self, svc: Service, port: int) -> L4Target | None:
        """The first applicable `tcp` rule's target; None: no rule, keep the default."""
        vs = self._vs(svc)
        if vs is None or not vs.spec.tcp:
            return None
        for rule in vs.spec.tcp:
            if not rule.match:
                return self._target(vs, rule.route, port)
            for m in rule.match:
                if m.destination_subnets:
                    continue  # runtime CIDR matches are not supported; analysis says so
                if static_match(
                    self.proxy,
                    port=m.port,
                    listener_port=port,
                    source_labels=m.source_labels,
                    source_namespace=m.source_namespace,
                    gateways=m.gateways,
                ):
                    return self._target(vs, rule.route, port)
        return None

    def tls_routes(self, svc: Service, port: int) -> list[TlsRoute] | None:
        """One route per applicable `tls` match (first wins per SNI set); None: no
        rule applies, keep the default chain."""
        vs = self._vs(svc)
        if vs is None or not vs.spec.tls:
            return None
        out: list[TlsRoute] = []
        seen: set[tuple[str, ...]] = set()
        for rule in vs.spec.tls:
            for m in rule.match:
                if m.destination_subnets:
                    continue
                if not static_match(
                    self.proxy,
                    port=m.port,
                    listener_port=port,
                    source_labels=m.source_labels,
                    source_namespace=m.source_namespace,
                    gateways=m.gateways,
                ):
                    continue
                names = tuple(
                    sorted({self.push.resolve_host(h, vs.config.namespace) for h in m.sni_hosts})
                )
                if "*" in names:
                    names = ()  # any SNI: a chain without server_names
                if names in seen:
                    continue  # same runtime match as an earlier one: never reached
                seen.add(names)
                out.append(TlsRoute(names, self._target(vs, rule.route, port)))
        return out or None

    def _target(
        self, vs: ResolvedVirtualService, routes: list[RouteDestination], port: int
    ) -> L4Target:
        ns = vs.config.namespace
        if len(routes) == 1:
            dest = self.clusters.resolve(ns, routes[0].destination, port)
            if self.clusters.has(dest.cluster):
                settings = self.tcp_settings(dest.service, dest.subset, dest.port)
                return L4Target.single(dest.cluster, settings)
            return L4Target.single(naming.BLACKHOLE_CLUSTER)
        weighted: list[tuple[str, int]] = []
        first: ResolvedDestination | None = None
        for rd in routes:
            if rd.weight <= 0:
                continue
            dest = self.clusters.resolve(ns, rd.destination, port)
            if self.clusters.has(dest.cluster):
                weighted.append((dest.cluster, rd.weight))
                first = first or dest
        if first is None:
            return L4Target.single(naming.BLACKHOLE_CLUSTER)
        # Istio: a split takes the first destination's rule, without subset settings,
        # and the VirtualService's name.namespace as stat prefix.
        return L4Target(
            first.cluster,
            tuple(weighted),
            f"{vs.config.name}.{vs.config.namespace}",
            self.tcp_settings(first.service, "", first.port),
        )
