"""Locality load balancing: failover priorities (only with outlier detection), failover
rules, failoverPriority labels, distribute weights, and who shares which assignment."""

from __future__ import annotations

import dataclasses

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from meshpilot.api.parse import parse_text
from meshpilot.config import ConfigKey, kinds
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.proxy import Locality, Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.translators.clusters import build_clusters, dns_clusters_depend_on_locality
from meshpilot.translators.endpoints import build_load_assignment, eds_cache_key
from meshpilot.translators.locality import lb_priority, locality_match
from meshpilot.xds import typeurls
from meshpilot.xds.generator import ConfigGenerator

from ._helpers import MESH, by_name, dedent, push_of, sidecar

C = cluster_pb2.Cluster
ZONES = "outbound|7000||zones.internal"

# One endpoint per locality; weights 1 except where noted.
ZONES_SE = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: zones, namespace: default}
spec:
  hosts: [zones.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 7000, name: http, protocol: HTTP}]
  endpoints:
  - {address: 10.20.0.1, locality: us-east/a/r1, labels: {version: v1}}
  - {address: 10.20.0.2, locality: us-east/a/r2, labels: {version: v2}}
  - {address: 10.20.0.3, locality: us-east/b, labels: {version: v1}}
  - {address: 10.20.0.4, locality: us-west/c, labels: {version: v2}, weight: 3}
  - {address: 10.20.0.5, locality: eu/x, labels: {version: v1}}
"""


def zones_dr(policy: str) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: zones, namespace: default}}
spec:
  host: zones.internal
  trafficPolicy:
{policy}
"""


def at(locality: str, **kwargs: object) -> Proxy:
    return dataclasses.replace(sidecar(**kwargs), locality=Locality.parse(locality))  # type: ignore[arg-type]


def priorities(cla: endpoint_pb2.ClusterLoadAssignment) -> dict[str, tuple[int, int]]:
    """address -> (priority, locality weight)."""
    return {
        e.endpoint.address.socket_address.address: (loc.priority, loc.load_balancing_weight.value)
        for loc in cla.endpoints
        for e in loc.lb_endpoints
    }


OUTLIER = "    outlierDetection: {consecutive5xxErrors: 1}"


def test_no_priorities_without_outlier_detection() -> None:
    push = push_of(ZONES_SE, zones_dr("    connectionPool: {tcp: {maxConnections: 5}}"))
    cla = build_load_assignment(push, at("us-east/a/r1"), ZONES)
    assert {p for p, _ in priorities(cla).values()} == {0}
    # Nothing depends on the proxy: every locality shares one assignment.
    assert eds_cache_key(push, at("us-east/a/r1"), ZONES) == eds_cache_key(push, at("eu/x"), ZONES)


def test_failover_priorities_relative_to_the_proxy_locality() -> None:
    push = push_of(ZONES_SE, zones_dr(OUTLIER))
    cla = build_load_assignment(push, at("us-east/a/r1"), ZONES)
    assert priorities(cla) == {
        "10.20.0.1": (0, 1),  # same region/zone/subzone
        "10.20.0.2": (1, 1),  # same region/zone
        "10.20.0.3": (2, 1),  # same region
        "10.20.0.4": (3, 3),  # elsewhere
        "10.20.0.5": (3, 1),
    }
    # Priorities never skip a level: a proxy in us-west sees 0 and 1 only.
    assert {
        p for p, _ in priorities(build_load_assignment(push, at("us-west/c"), ZONES)).values()
    } == {0, 1}
    key_a = eds_cache_key(push, at("us-east/a/r1"), ZONES)
    assert key_a != eds_cache_key(push, at("us-east/a/r2"), ZONES)
    assert key_a == eds_cache_key(push, at("us-east/a/r1", ip="10.0.0.8", name="x"), ZONES)


def test_cluster_has_no_locality_weighted_config_for_default_failover() -> None:
    push = push_of(ZONES_SE, zones_dr(OUTLIER))
    c = by_name(build_clusters(push, at("us-east/a/r1")))[ZONES]
    assert not c.common_lb_config.HasField("locality_weighted_lb_config")
    assert c.common_lb_config.healthy_panic_threshold.value == 0


def test_failover_rules_demote_other_regions() -> None:
    push = push_of(
        ZONES_SE,
        zones_dr(
            OUTLIER
            + "\n    loadBalancer: {localityLbSetting: {failover: [{from: us-east, to: eu}]}}"
        ),
    )
    cla = build_load_assignment(push, at("us-east/a/r1"), ZONES)
    got = {a: p for a, (p, _) in priorities(cla).items()}
    assert got == {
        "10.20.0.1": 0,
        "10.20.0.2": 1,
        "10.20.0.3": 2,
        "10.20.0.5": 3,  # the failover target region
        "10.20.0.4": 4,
    }
    c = by_name(build_clusters(push, at("us-east/a/r1")))[ZONES]
    assert c.common_lb_config.HasField("locality_weighted_lb_config")
    # A rule from another region changes nothing for a us-west proxy.
    west = build_load_assignment(push, at("us-west/c"), ZONES)
    assert {a: p for a, (p, _) in priorities(west).items()}["10.20.0.5"] == 1


def test_failover_rules_need_outlier_detection() -> None:
    push = push_of(
        ZONES_SE,
        zones_dr("    loadBalancer: {localityLbSetting: {failover: [{from: us-east, to: eu}]}}"),
    )
    cla = build_load_assignment(push, at("us-east/a/r1"), ZONES)
    assert {p for p, _ in priorities(cla).values()} == {0}
    c = by_name(build_clusters(push, at("us-east/a/r1")))[ZONES]
    assert not c.common_lb_config.HasField("locality_weighted_lb_config")


def test_locality_lb_disabled() -> None:
    push = push_of(
        ZONES_SE, zones_dr(OUTLIER + "\n    loadBalancer: {localityLbSetting: {enabled: false}}")
    )
    cla = build_load_assignment(push, at("us-east/a/r1"), ZONES)
    assert {p for p, _ in priorities(cla).values()} == {0}
    assert eds_cache_key(push, at("us-east/a/r1"), ZONES)[3] is None


def test_distribute_weights_and_drops_unnamed_localities() -> None:
    push = push_of(
        ZONES_SE,
        zones_dr(
            """    loadBalancer:
      localityLbSetting:
        distribute:
        - from: us-east/a/*
          to: {"us-east/a/*": 80, "us-west/*": 20}
        - from: eu/*
          to: {"eu/x": 100}"""
        ),
    )
    east = build_load_assignment(push, at("us-east/a/r2"), ZONES)
    # A wildcard target shares its weight by the localities' own weights (rounded up).
    assert priorities(east) == {
        "10.20.0.1": (0, 40),
        "10.20.0.2": (0, 40),
        "10.20.0.4": (0, 20),
    }
    eu = build_load_assignment(push, at("eu/x"), ZONES)
    assert priorities(eu) == {"10.20.0.5": (0, 100)}
    # No rule for us-west: the assignment stays as it is.
    assert len(build_load_assignment(push, at("us-west/c"), ZONES).endpoints) == 5
    c = by_name(build_clusters(push, at("us-east/a/r1")))[ZONES]
    assert c.common_lb_config.HasField("locality_weighted_lb_config")
    # Proxies matching the same rule share the assignment.
    k1 = eds_cache_key(push, at("us-east/a/r1"), ZONES)
    assert k1 == eds_cache_key(push, at("us-east/a/r2"), ZONES)
    assert k1 != eds_cache_key(push, at("eu/x"), ZONES)


def test_failover_priority_labels() -> None:
    push = push_of(
        ZONES_SE,
        zones_dr(
            OUTLIER + "\n    loadBalancer: {localityLbSetting: {failoverPriority: [version]}}"
        ),
    )
    v1 = at("us-east/a/r1", labels={"app": "c", "version": "v1"})
    got = {a: p for a, (p, _) in priorities(build_load_assignment(push, v1, ZONES)).items()}
    assert got == {
        "10.20.0.1": 0,
        "10.20.0.3": 0,
        "10.20.0.5": 0,
        "10.20.0.2": 1,
        "10.20.0.4": 1,
    }
    v2 = at("us-east/a/r1", labels={"app": "c", "version": "v2"})
    assert eds_cache_key(push, v1, ZONES) != eds_cache_key(push, v2, ZONES)
    # Locality does not matter here (no failover list): same key across zones.
    assert eds_cache_key(push, v1, ZONES) == eds_cache_key(
        push, at("eu/x", labels={"app": "d", "version": "v1"}), ZONES
    )


def test_failover_priority_with_fixed_value_and_failover() -> None:
    push = push_of(
        ZONES_SE,
        zones_dr(
            OUTLIER + "\n    loadBalancer: {localityLbSetting: {failoverPriority: [version=v2], "
            "failover: [{from: us-east, to: us-west}]}}"
        ),
    )
    cla = build_load_assignment(push, at("us-east/a/r1", labels={"app": "c"}), ZONES)
    got = {a: p for a, (p, _) in priorities(cla).items()}
    # version=v2 first (label order), then by locality within each level.
    assert (
        got["10.20.0.2"] < got["10.20.0.4"] < got["10.20.0.1"] < got["10.20.0.3"] < got["10.20.0.5"]
    )


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("us-east", True),
        ("us-east/*", True),
        ("us-east/a", True),
        ("us-east/a/r1", True),
        ("us-east/a/*", True),
        ("*", True),
        ("us-east/b", False),
        ("us-west", False),
        ("us-east/a/r2", False),
    ],
)
def test_locality_match(rule: str, expected: bool) -> None:
    assert locality_match(Locality("us-east", "a", "r1"), rule) is expected


def test_lb_priority_levels() -> None:
    me = Locality("r", "z", "s")
    assert [
        lb_priority(me, Locality(*parts))
        for parts in (("r", "z", "s"), ("r", "z", "t"), ("r", "y", "s"), ("q", "z", "s"))
    ] == [0, 1, 2, 3]


# --- DNS clusters: locality in CDS -------------------------------------------------------------

DNS_ZONES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dnszones, namespace: default}
spec:
  hosts: [dns.zones.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints:
  - {address: a.example.com, locality: us-east/a}
  - {address: b.example.com, locality: us-west/b}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: dnszones, namespace: default}
spec:
  host: dns.zones.example.com
  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2}}
"""


def test_dns_cluster_endpoints_get_locality_priorities() -> None:
    push = push_of(DNS_ZONES)
    c = by_name(build_clusters(push, at("us-west/b")))["outbound|80||dns.zones.example.com"]
    assert priorities(c.load_assignment) == {"a.example.com": (1, 1), "b.example.com": (0, 1)}
    assert dns_clusters_depend_on_locality(push, at("us-west/b"))
    assert not dns_clusters_depend_on_locality(push_of(ZONES_SE, zones_dr(OUTLIER)), sidecar())


def test_generator_keys_cds_by_locality_only_when_dns_clusters_need_it() -> None:
    gen = ConfigGenerator()
    push = push_of(DNS_ZONES)
    east = gen.generate(typeurls.CLUSTER, at("us-east/a"), push, None, None)
    west = gen.generate(typeurls.CLUSTER, at("us-west/b"), push, None, None)
    assert east is not None and west is not None
    assert east.resources != west.resources
    plain = push_of(ZONES_SE, zones_dr(OUTLIER))
    one = gen.generate(typeurls.CLUSTER, at("us-east/a"), plain, None, None)
    two = gen.generate(typeurls.CLUSTER, at("us-west/b"), plain, None, None)
    assert one is not None and two is not None
    assert one.resources is two.resources  # one scope, generated once


# --- the generator: shared and per-locality assignments, carry-over ------------------------------


def _store(*docs: str) -> ConfigStore:
    store = ConfigStore()
    result = parse_text("\n---\n".join([MESH, *map(dedent, docs)]), "mesh.yaml")
    assert result.errors == []
    store.set_origin("mesh.yaml", result.configs)
    return store


def test_generator_shares_assignments_unless_locality_applies() -> None:
    gen = ConfigGenerator()
    names = frozenset({ZONES, "outbound|9080||reviews.default.svc.cluster.local"})
    push = PushContext.build(_store(ZONES_SE, zones_dr(OUTLIER)).snapshot(), push_of().mesh)
    east = gen.generate(typeurls.ENDPOINT, at("us-east/a/r1"), push, names, None)
    west = gen.generate(typeurls.ENDPOINT, at("us-west/c"), push, names, None)
    assert east is not None and west is not None
    e, w = (dict((r.name, r) for r in g.resources) for g in (east, west))
    assert e[ZONES] is not w[ZONES]
    reviews = "outbound|9080||reviews.default.svc.cluster.local"
    assert e[reviews] is w[reviews]


def test_endpoint_only_push_carries_unchanged_locality_assignments_over() -> None:
    gen = ConfigGenerator()
    store = _store(ZONES_SE, zones_dr(OUTLIER))
    first = PushContext.build(store.snapshot(), push_of().mesh)
    proxy = at("us-east/a/r1")
    names = frozenset({ZONES, "outbound|9080||ratings.default.svc.cluster.local"})
    before = gen.generate(typeurls.ENDPOINT, proxy, first, names, None)
    assert before is not None
    # ratings-v1 moves: an endpoint-only change for the ratings host alone.
    moved = parse_text(
        dedent("""
        apiVersion: networking.istio.io/v1
        kind: WorkloadEntry
        metadata: {name: ratings-v1, namespace: default}
        spec: {address: 10.0.0.33, labels: {app: ratings}}
        """),
        "moved.yaml",
    )
    store.apply(moved.configs[0], "mesh.yaml")
    second = first.with_endpoint_changes(
        store.snapshot(), frozenset({ConfigKey(kinds.WORKLOAD_ENTRY, "default", "ratings-v1")})
    )
    assert second.changed_hosts == frozenset({"ratings.default.svc.cluster.local"})
    gen.on_new_context(first, second)
    after = gen.generate(typeurls.ENDPOINT, proxy, second, names, None)
    assert after is not None
    b, a = (dict((r.name, r) for r in g.resources) for g in (before, after))
    assert a[ZONES] is b[ZONES]  # carried over, not rebuilt
    assert (
        a["outbound|9080||ratings.default.svc.cluster.local"]
        is not b["outbound|9080||ratings.default.svc.cluster.local"]
    )
