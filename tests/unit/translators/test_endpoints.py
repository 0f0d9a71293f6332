"""EDS: ClusterLoadAssignments."""

from __future__ import annotations

import pytest

from meshpilot.translators.endpoints import build_load_assignment

from ._helpers import RATINGS, REVIEWS, push_of, serialized, sidecar


def _eps(cla) -> list[tuple[str, int, int]]:  # type: ignore[no-untyped-def]
    return [
        (
            e.endpoint.address.socket_address.address,
            e.endpoint.address.socket_address.port_value,
            e.load_balancing_weight.value,
        )
        for loc in cla.endpoints
        for e in loc.lb_endpoints
    ]


def test_service_endpoints_with_target_port_and_weight() -> None:
    name = f"outbound|9080||{REVIEWS}"
    cla = build_load_assignment(push_of(), sidecar(), name)
    assert cla.cluster_name == name
    assert _eps(cla) == [("10.0.0.1", 8080, 1), ("10.0.0.2", 8080, 5)]
    (loc,) = cla.endpoints
    assert loc.load_balancing_weight.value == 6


def test_endpoint_metadata_like_istio() -> None:
    cla = build_load_assignment(push_of(), sidecar(), f"outbound|9080||{REVIEWS}")
    first = cla.endpoints[0].lb_endpoints[0]
    istio = first.metadata.filter_metadata["istio"]
    assert istio["workload"] == "reviews-v1;default;reviews;v1;"
    assert first.metadata.filter_metadata["envoy.transport_socket_match"]["tlsMode"] == "istio"
    second = cla.endpoints[0].lb_endpoints[1]
    assert "envoy.transport_socket_match" not in second.metadata.filter_metadata


def test_grouped_by_locality_with_summed_weights() -> None:
    cla = build_load_assignment(push_of(), sidecar(), "outbound|5432||db.internal")
    localities = [
        (
            (loc.locality.region, loc.locality.zone, loc.locality.sub_zone),
            loc.load_balancing_weight.value,
        )
        for loc in cla.endpoints
    ]
    assert localities == [(("us-east", "a", ""), 5), (("us-east", "b", "rack1"), 1)]
    assert _eps(cla) == [("10.10.0.1", 5432, 2), ("10.10.0.2", 5432, 3), ("10.10.1.1", 5432, 1)]


@pytest.mark.parametrize(
    "name",
    [
        "outbound|9080||nope.default.svc.cluster.local",
        f"outbound|9999||{RATINGS}",
        "inbound|8080||",
        "BlackHoleCluster",
        "not|a|cluster",
        "",
    ],
)
def test_unknown_cluster_gets_empty_assignment(name: str) -> None:
    cla = build_load_assignment(push_of(), sidecar(), name)
    assert cla.cluster_name == name
    assert len(cla.endpoints) == 0


def test_subset_without_destination_rule_is_empty() -> None:
    # No rule defines the subset: no cluster has that name, and no endpoint belongs to it.
    cla = build_load_assignment(push_of(), sidecar(), f"outbound|9080|v1|{REVIEWS}")
    assert cla.cluster_name == f"outbound|9080|v1|{REVIEWS}"
    assert len(cla.endpoints) == 0


def test_deterministic() -> None:
    names = [f"outbound|9080||{REVIEWS}", "outbound|5432||db.internal"]
    a = [build_load_assignment(push_of(), sidecar(), n) for n in names]
    b = [build_load_assignment(push_of(), sidecar(), n) for n in names]
    assert serialized(a) == serialized(b)
