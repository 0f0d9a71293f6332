"""EDS: ClusterLoadAssignments for `outbound|PORT|SUBSET|HOST` clusters."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import struct_pb2

from meshpilot.model.proxy import Locality
from meshpilot.model.service import Endpoint, labels_match
from meshpilot.translators import naming
from meshpilot.translators.common import socket_address, uint32

ISTIO_METADATA = "istio"
TRANSPORT_SOCKET_MATCH_METADATA = "envoy.transport_socket_match"
_CANONICAL_NAME_LABELS = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION_LABELS = (
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
)

if TYPE_CHECKING:
    # Type only: keeps the translators from importing the store and sources at runtime.
    from meshpilot.model.push_context import PushContext


def subset_labels(push: PushContext, hostname: str, subset: str) -> Mapping[str, str] | None:
    """Labels that select the endpoints of `subset`; None keeps every endpoint.

    The hook for DestinationRule subsets. Until they are indexed every subset sees
    all endpoints of its host.
    """
    del push, hostname, subset
    return None


def build_load_assignment(
    push: PushContext, cluster_name: str
) -> endpoint_pb2.ClusterLoadAssignment:
    """The CLA for `cluster_name`; empty (never None) for anything unknown, because
    Envoy keeps a cluster warming until it gets the CLA it asked for."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name)
    parsed = naming.parse_cluster_name(cluster_name)
    if parsed is None or parsed[0] != naming.OUTBOUND:
        return cla
    _, port, subset, hostname = parsed
    endpoints: Iterable[Endpoint] = push.service_endpoints(hostname, port)
    if subset:
        selector = subset_labels(push, hostname, subset)
        if selector is not None:
            endpoints = [ep for ep in endpoints if labels_match(selector, ep.labels)]
    cla.endpoints.extend(locality_lb_endpoints(endpoints))
    return cla


def locality_lb_endpoints(
    endpoints: Iterable[Endpoint],
) -> list[endpoint_components_pb2.LocalityLbEndpoints]:
    """Endpoints grouped by locality (sorted), weighted, in a stable order."""
    by_locality: dict[str, list[Endpoint]] = {}
    for ep in endpoints:
        by_locality.setdefault(ep.locality, []).append(ep)
    out = []
    for locality in sorted(by_locality):
        group = sorted(by_locality[locality], key=lambda e: (e.address, e.port))
        loc = Locality.parse(locality)
        lle = endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(region=loc.region, zone=loc.zone, sub_zone=loc.subzone),
            lb_endpoints=[lb_endpoint(ep) for ep in group],
            load_balancing_weight=uint32(sum(_weight(ep) for ep in group)),
        )
        out.append(lle)
    return out


def lb_endpoint(ep: Endpoint) -> endpoint_components_pb2.LbEndpoint:
    out = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(address=socket_address(ep.address, ep.port)),
        load_balancing_weight=uint32(_weight(ep)),
    )
    if ep.workload_name or ep.tls_mode == "istio":
        _endpoint_metadata(out.metadata, ep)
    return out


def _weight(ep: Endpoint) -> int:
    # Envoy requires weights >= 1; the sum per locality must fit in uint32.
    return min(max(ep.weight, 1), 2**24)


def _endpoint_metadata(md: base_pb2.Metadata, ep: Endpoint) -> None:
    if ep.tls_mode == "istio":
        # Lets the cluster's transport_socket_matches pick mTLS per endpoint, as Istio.
        md.filter_metadata[TRANSPORT_SOCKET_MATCH_METADATA].CopyFrom(
            _struct({"tlsMode": ep.tls_mode})
        )
    if ep.workload_name:
        # Istio's `workload` key: NAME;NAMESPACE;CANONICAL_NAME;CANONICAL_REVISION;CLUSTER.
        name = next((ep.labels[k] for k in _CANONICAL_NAME_LABELS if k in ep.labels), "")
        rev = next((ep.labels[k] for k in _CANONICAL_REVISION_LABELS if k in ep.labels), "")
        workload = ";".join(
            (ep.workload_name, ep.namespace, name or ep.workload_name, rev or "latest", "")
        )
        md.filter_metadata[ISTIO_METADATA].CopyFrom(_struct({"workload": workload}))


def _struct(values: Mapping[str, object]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(dict(values))
    return out
