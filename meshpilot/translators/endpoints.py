"""EDS: ClusterLoadAssignments for `outbound|PORT|SUBSET|HOST` clusters.

A subset's assignment holds the endpoints its labels select, in the DestinationRule
that applies to the requesting proxy (which depends on the proxy's namespace). Locality
priorities and weights depend on the proxy's locality, only where the rule asks for
them; `eds_cache_key` says which proxies can share one assignment.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from meshpilot.api.networking import LocalityLbSetting
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.service import Endpoint, Service, labels_match
from meshpilot.translators import naming
from meshpilot.translators.locality import (
    LocalityGroup,
    apply_locality_lb,
    endpoint_weight,
    group_by_locality,
    locality_key,
)
from meshpilot.translators.traffic_policy import (
    NO_POLICY,
    dr_identity,
    find_subset,
    locality_lb_setting,
    merge_traffic_policy,
)

ISTIO_METADATA = "istio"
TRANSPORT_SOCKET_MATCH_METADATA = "envoy.transport_socket_match"
_CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_LABELS = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)


@dataclass(frozen=True, slots=True)
class _Plan:
    """Everything a ClusterLoadAssignment depends on besides the endpoints themselves."""

    hostname: str
    port: int
    # None: every endpoint of the port; else the subset's label selector.
    selector: Mapping[str, str] | None
    setting: LocalityLbSetting | None
    enable_failover: bool
    key: Hashable


def subset_labels(
    push: PushContext, proxy: Proxy, service: Service, subset: str
) -> Mapping[str, str] | None:
    """Labels selecting the endpoints of `subset` in the DestinationRule that applies to
    `proxy`; None when that rule has no such subset."""
    found = find_subset(push.destination_rule(proxy.namespace, service), subset)
    return found.labels if found is not None else None


def _plan(push: PushContext, proxy: Proxy, cluster_name: str) -> _Plan | None:
    """None for names that get an empty assignment: not outbound, unknown host or port,
    or a subset the applicable DestinationRule does not define."""
    parsed = naming.parse_cluster_name(cluster_name)
    if parsed is None or parsed[0] != naming.OUTBOUND:
        return None
    _, port, subset, hostname = parsed
    svc = push.services.get(hostname)
    if svc is None or svc.port(port) is None:
        return None
    dr = push.destination_rule(proxy.namespace, svc)
    found = find_subset(dr, subset)
    if subset and found is None:
        return None
    policy = (
        merge_traffic_policy(dr.spec.traffic_policy, found.traffic_policy if found else None, port)
        if dr is not None
        else NO_POLICY
    )
    setting = locality_lb_setting(policy)
    enable_failover = policy.outlier_detection is not None
    where = locality_key(setting, enable_failover, proxy)
    # The rule matters through the subset's labels and the locality setting; proxies
    # that see different rules (or none) share an assignment whenever neither applies.
    rule = dr_identity(dr) if (subset or where is not None) else None
    return _Plan(
        hostname,
        port,
        found.labels if found is not None else None,
        setting,
        enable_failover,
        ("eds", cluster_name, rule, where),
    )


def eds_cache_key(push: PushContext, proxy: Proxy, cluster_name: str) -> Hashable:
    """Proxies with equal keys get the same ClusterLoadAssignment for `cluster_name` from
    the same push context. Always a tuple `("eds", cluster_name, ...)`.

    A function of the push, the cluster name and the proxy's namespace, locality and
    labels only (callers may memoize on those)."""
    return eds_cache_entry(push, proxy, cluster_name)[0]


def build_load_assignment(
    push: PushContext, proxy: Proxy, cluster_name: str
) -> endpoint_pb2.ClusterLoadAssignment:
    """The CLA for `cluster_name` as `proxy` sees it; empty (never None) for anything
    unknown, because Envoy keeps a cluster warming until it gets the CLA it asked for."""
    return eds_cache_entry(push, proxy, cluster_name)[1]()


def eds_cache_entry(
    push: PushContext, proxy: Proxy, cluster_name: str
) -> tuple[Hashable, Callable[[], endpoint_pb2.ClusterLoadAssignment]]:
    """`eds_cache_key` and a builder for the assignment, sharing the rule lookup."""
    plan = _plan(push, proxy, cluster_name)
    if plan is None:
        return ("eds", cluster_name), lambda: endpoint_pb2.ClusterLoadAssignment(
            cluster_name=cluster_name
        )
    return plan.key, lambda: _build(push, proxy, cluster_name, plan)


def _build(
    push: PushContext, proxy: Proxy, cluster_name: str, plan: _Plan
) -> endpoint_pb2.ClusterLoadAssignment:
    endpoints: Iterable[Endpoint] = push.service_endpoints(plan.hostname, plan.port)
    if plan.selector:
        endpoints = [ep for ep in endpoints if labels_match(plan.selector, ep.labels)]
    groups = apply_locality_lb(
        group_by_locality(endpoints), proxy, plan.setting, plan.enable_failover
    )
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name)
    _add_groups(cla.endpoints, groups)
    return cla


def locality_lb_endpoints(
    endpoints: Iterable[Endpoint],
) -> list[endpoint_components_pb2.LocalityLbEndpoints]:
    """Endpoints grouped by locality (sorted), weighted, in a stable order."""
    return locality_lb_endpoints_of(group_by_locality(endpoints))


def locality_lb_endpoints_of(
    groups: Iterable[LocalityGroup],
) -> list[endpoint_components_pb2.LocalityLbEndpoints]:
    cla = endpoint_pb2.ClusterLoadAssignment()
    _add_groups(cla.endpoints, groups)
    return list(cla.endpoints)


def _add_groups(out: Any, groups: Iterable[LocalityGroup]) -> None:
    # Fields are set in place (add(), attribute writes): several times faster than
    # nested constructors, and assignments hold one LbEndpoint per endpoint.
    for g in groups:
        lle = out.add()
        loc = g.locality
        lle.locality.region = loc.region
        lle.locality.zone = loc.zone
        lle.locality.sub_zone = loc.subzone
        lle.locality.SetInParent()
        for ep in g.endpoints:
            _fill_lb_endpoint(lle.lb_endpoints.add(), ep)
        lle.load_balancing_weight.value = g.weight
        lle.priority = g.priority


def lb_endpoint(ep: Endpoint) -> endpoint_components_pb2.LbEndpoint:
    out = endpoint_components_pb2.LbEndpoint()
    _fill_lb_endpoint(out, ep)
    return out


def _fill_lb_endpoint(out: endpoint_components_pb2.LbEndpoint, ep: Endpoint) -> None:
    sa = out.endpoint.address.socket_address
    sa.address = ep.address
    sa.port_value = ep.port
    out.load_balancing_weight.value = endpoint_weight(ep)
    if ep.workload_name or ep.tls_mode == "istio":
        _endpoint_metadata(out.metadata, ep)


def _endpoint_metadata(md: base_pb2.Metadata, ep: Endpoint) -> None:
    # Struct fields are set directly: Struct.update is several times slower, and there
    # is one of these per endpoint per assignment.
    if ep.tls_mode == "istio":
        # Lets the cluster's transport_socket_matches pick mTLS per endpoint, as Istio.
        md.filter_metadata[TRANSPORT_SOCKET_MATCH_METADATA].fields[
            "tlsMode"
        ].string_value = ep.tls_mode
    if ep.workload_name:
        # Istio's `workload` key: NAME;NAMESPACE;CANONICAL_NAME;CANONICAL_REVISION;CLUSTER.
        name = next((ep.labels[k] for k in _CANONICAL_NAME_LABELS if k in ep.labels), "")
        rev = next((ep.labels[k] for k in _CANONICAL_REVISION_LABELS if k in ep.labels), "")
        workload = ";".join(
            (ep.workload_name, ep.namespace, name or ep.workload_name, rev or "latest", "")
        )
        md.filter_metadata[ISTIO_METADATA].fields["workload"].string_value = workload
