"""Istio-compatible resource names."""

from __future__ import annotations

import pytest

from meshpilot.translators import naming


def test_cluster_names_match_istio() -> None:
    host = "reviews.default.svc.cluster.local"
    assert naming.outbound_cluster_name(9080, "", host) == f"outbound|9080||{host}"
    assert naming.outbound_cluster_name(9080, "v1", host) == f"outbound|9080|v1|{host}"
    assert naming.inbound_cluster_name(8080) == "inbound|8080||"
    assert naming.outbound_sni(9080, "v1", host) == f"outbound_.9080_.v1_.{host}"


def test_fixed_names() -> None:
    assert naming.BLACKHOLE_CLUSTER == "BlackHoleCluster"
    assert naming.PASSTHROUGH_CLUSTER == "PassthroughCluster"
    assert naming.INBOUND_PASSTHROUGH_CLUSTER == "InboundPassthroughCluster"
    assert naming.VIRTUAL_OUTBOUND == "virtualOutbound"
    assert naming.VIRTUAL_INBOUND == "virtualInbound"
    assert naming.listener_name("0.0.0.0", 9080) == "0.0.0.0_9080"
    assert naming.route_name_for_port(9080) == "9080"
    assert naming.alt_stat_name("outbound|80||a.b") == "outbound|80||a.b;"
    assert naming.outbound_http_stat_prefix("0.0.0.0", 9080) == "outbound_0.0.0.0_9080"
    assert naming.inbound_http_stat_prefix("0.0.0.0", 8080) == "inbound_0.0.0.0_8080;"


@pytest.mark.parametrize(
    ("name", "parsed"),
    [
        ("outbound|9080||r.ns.svc.cluster.local", ("outbound", 9080, "", "r.ns.svc.cluster.local")),
        ("outbound|9080|v1|r.ns.svc", ("outbound", 9080, "v1", "r.ns.svc")),
        ("inbound|8080||", ("inbound", 8080, "", "")),
        ("BlackHoleCluster", None),
        ("outbound|x||h", None),
        ("outbound|0||h", None),
        ("outbound|70000||h", None),
        ("sideways|80||h", None),
        ("outbound|80|h", None),
        ("", None),
    ],
)  # fmt: skip
def test_parse_cluster_name(name: str, parsed: tuple[str, int, str, str] | None) -> None:
    assert naming.parse_cluster_name(name) == parsed


def test_parse_round_trips() -> None:
    name = naming.outbound_cluster_name(443, "canary", "api.example.com")
    assert naming.parse_cluster_name(name) == ("outbound", 443, "canary", "api.example.com")
