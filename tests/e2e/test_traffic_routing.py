"""Traffic management, routing: Istio's bookinfo manifests applied unchanged, checked
through real Envoy sidecars (scenarios 1, 2, 3 and 12)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.bookinfo import (
    BookinfoFactory,
    binomial_tolerance,
    cluster,
    sample,
)
from tests.e2e.harness import ProcessTracker, wait_for

DR_ALL = "bookinfo/networking/destination-rule-all.yaml"
SPLIT_REQUESTS = 400


@pytest.fixture
async def bookinfo(processes: ProcessTracker, tmp_path: Path) -> AsyncIterator[BookinfoFactory]:
    factory = BookinfoFactory(processes, tmp_path)
    try:
        yield factory
    finally:
        await factory.close()


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_1_all_v1_sends_every_reviews_request_to_v1(
    bookinfo: BookinfoFactory, delta: bool
) -> None:
    bi = await bookinfo(delta=delta)
    # Without routing rules the reviews requests spread over v1, v2 and v3: the
    # baseline that makes the next step meaningful.
    before = await bi.versions("reviews", 60)
    assert set(before) == {"v1", "v2", "v3"}, before

    await bi.apply(sample(DR_ALL), sample("bookinfo/networking/virtual-service-all-v1.yaml"))
    counts = bi.counts("reviews-v1", "reviews-v2", "reviews-v3")
    seen = await bi.versions("reviews", 100, "/reviews/0")
    assert seen == Counter({"v1": 100}), f"{seen}\n{await bi.routes()}"
    after = bi.counts("reviews-v1", "reviews-v2", "reviews-v3")
    assert after["reviews-v1"] - counts["reviews-v1"] == 100
    assert after["reviews-v2"] == counts["reviews-v2"]
    assert after["reviews-v3"] == counts["reviews-v3"]
    for host in ("productpage", "details", "ratings"):
        assert await bi.versions(host, 5) == Counter({"v1": 5})
    # The subset clusters of destination-rule-all exist, with the right endpoints.
    envoy = bi.sidecar()
    for version in ("v1", "v2", "v3"):
        hosts = await envoy.cluster_hosts(cluster("reviews", subset=version))
        assert hosts == [f"{bi.workloads['reviews-' + version].address}:9080"], version


async def test_2_jason_gets_reviews_v2_others_v1(bookinfo: BookinfoFactory) -> None:
    bi = await bookinfo(
        files=[
            sample(DR_ALL),
            sample("bookinfo/networking/virtual-service-reviews-test-v2.yaml"),
        ]
    )
    jason, anonymous, alice, capital = await asyncio.gather(
        bi.versions("reviews", 40, headers={"end-user": "jason"}),
        bi.versions("reviews", 40),
        bi.versions("reviews", 40, headers={"end-user": "alice"}),
        # Header values match exactly, case included.
        bi.versions("reviews", 20, headers={"end-user": "Jason"}),
    )
    routes = await bi.routes()
    assert jason == Counter({"v2": 40}), f"{jason}\n{routes}"
    assert anonymous == Counter({"v1": 40}), f"{anonymous}\n{routes}"
    assert alice == Counter({"v1": 40}), f"{alice}\n{routes}"
    assert capital == Counter({"v1": 20}), f"{capital}\n{routes}"
    assert bi.counts("reviews-v3") == {"reviews-v3": 0}
    # The header reached v2 unchanged: the match is the only thing that moved it.
    assert {r.headers.get("end-user") for r in bi.app("reviews-v2").requests} == {"jason"}


def _check_split(seen: Counter[str], weights: dict[str, int], routes: str) -> None:
    n = sum(seen.values())
    assert set(seen) <= set(weights), f"answers from outside the split: {seen}\n{routes}"
    for version, weight in weights.items():
        p = weight / 100
        tol = binomial_tolerance(n, p)
        assert abs(seen[version] - n * p) <= tol, (
            f"{version}: {seen[version]} of {n}, expected {n * p:.0f} +- {tol:.0f}: "
            f"{seen}\n{routes}"
        )


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_3_weighted_shifts_50_v3_80_20_90_10(bookinfo: BookinfoFactory, delta: bool) -> None:
    steps = [
        ("virtual-service-reviews-50-v3.yaml", {"v1": 50, "v3": 50}),
        ("virtual-service-reviews-80-20.yaml", {"v1": 80, "v2": 20}),
        ("virtual-service-reviews-90-10.yaml", {"v1": 90, "v2": 10}),
    ]
    bi = await bookinfo(delta=delta, files=[sample(DR_ALL)])
    previous: str | None = None
    for name, weights in steps:
        manifest = sample(f"bookinfo/networking/{name}")
        await bi.apply(manifest, remove=[previous] if previous else ())
        previous = manifest.name
        seen = await bi.versions("reviews", SPLIT_REQUESTS, "/reviews/0")
        _check_split(seen, weights, await bi.routes(name="9080"))


async def test_12_consistent_hash_redirect_rewrite_mirror(bookinfo: BookinfoFactory) -> None:
    hashing = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash:
        httpHeaderName: x-user
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
  - name: v3
    labels: {version: v3}
"""
    # Mirror when asked for by header, else the service with the hash policy.
    mirror = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts: [reviews]
  http:
  - match:
    - headers:
        x-mirror-test: {exact: "yes"}
    route:
    - destination: {host: reviews, subset: v1}
    mirror: {host: reviews, subset: v2}
    mirrorPercentage: {value: 100.0}
  - route:
    - destination: {host: reviews}
"""
    redirect = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: details
spec:
  hosts: [details]
  http:
  - match:
    - uri: {prefix: /old-details}
    redirect:
      uri: /details/0
  - route:
    - destination: {host: details}
"""
    rewrite = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts: [ratings]
  http:
  - match:
    - uri: {prefix: /old-ratings/}
    rewrite:
      uri: /ratings/
      authority: ratings-rewritten.example
    route:
    - destination: {host: ratings}
"""
    bi = await bookinfo(
        files=[
            ("reviews-dr.yaml", hashing),
            ("reviews-vs.yaml", mirror),
            ("details-vs.yaml", redirect),
            ("ratings-vs.yaml", rewrite),
        ]
    )
    routes = await bi.routes(name="9080")

    async def consistent_hash() -> None:
        alice = await bi.versions("reviews", 50, headers={"x-user": "alice"}, concurrency=8)
        assert len(alice) == 1 and "HTTP" not in next(iter(alice)), f"{alice}\n{routes}"
        # Each user sticks to one backend; different users spread over the three.
        per_user = {}
        for i in range(30):
            seen = await bi.versions("reviews", 3, headers={"x-user": f"user-{i}"}, concurrency=3)
            assert len(seen) == 1, f"user-{i}: {seen}\n{routes}"
            per_user[i] = next(iter(seen))
        assert len(set(per_user.values())) >= 2, f"{per_user}\n{routes}"

    async def redirect_once() -> None:
        before = bi.counts("details-v1")
        resp = await bi.call("details", "/old-details?x=1")
        assert resp.status == 301, f"{resp.status} {resp.text}\n{routes}"
        location = resp.headers.get("location", "")
        assert location.startswith("http://details:9080/details/0"), location
        assert bi.counts("details-v1") == before, "a redirect must not reach the backend"

    async def rewrite_once() -> None:
        resp = await bi.call("ratings", "/old-ratings/7")
        assert resp.status == 200, f"{resp.status} {resp.text}\n{routes}"
        last = bi.app("ratings-v1").requests[-1]
        assert last.path == "/ratings/7", f"{last.path}\n{routes}"
        assert last.host == "ratings-rewritten.example", f"{last.host}\n{routes}"
        # The answer says so too (the app echoes what it received).
        assert resp.json()["path"] == "/ratings/7"

    async def mirror_once() -> None:
        path = "/reviews/mirrored"
        resp = await bi.call("reviews", path, headers={"x-mirror-test": "yes"})
        assert resp.status == 200, f"{resp.status} {resp.text}\n{routes}"
        # The client gets the primary's answer; v2 gets a copy, whose answer is dropped.
        assert resp.json()["version"] == "v1", f"{resp.text}\n{routes}"
        v2 = bi.app("reviews-v2")
        copy = await wait_for(
            lambda: [r for r in v2.requests if r.path == path],
            3.0,
            message="the mirrored copy to reach reviews v2",
        )
        assert len(copy) == 1
        assert "-shadow" in copy[0].host, copy[0].host  # Envoy marks shadowed requests
        assert [r.path for r in bi.app("reviews-v1").requests].count(path) == 1
        assert [r.path for r in bi.app("reviews-v3").requests].count(path) == 0

    await asyncio.gather(consistent_hash(), redirect_once(), rewrite_once(), mirror_once())


async def test_split_share_of_a_subset_no_rule_defines_gets_503(bookinfo: BookinfoFactory) -> None:
    """80 v1 / 20 v3 with a DestinationRule that has no v3: as in Istio, the v3 share
    keeps its weight and Envoy answers it 503 (no cluster); v1 keeps 80%. Envoy
    accepts the route that names the missing cluster (validate_clusters is off)."""
    rule = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
"""
    split = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 80
    - destination: {host: reviews, subset: v3}
      weight: 20
"""
    bi = await bookinfo(files=[("reviews-dr.yaml", rule), ("reviews-vs.yaml", split)])
    envoy = bi.sidecar()
    routes = await bi.routes(name="9080")
    assert cluster("reviews", subset="v3") in routes, routes
    assert cluster("reviews", subset="v3") not in await bi.cluster_names()
    rejected = await envoy.stats(r"rds\.9080\.update_rejected$")
    assert rejected and all(v == 0 for v in rejected.values()), rejected

    seen = await bi.versions("reviews", SPLIT_REQUESTS, "/reviews/0")
    _check_split(Counter({"v1": seen["v1"], "v3": seen["HTTP 503"]}), {"v1": 80, "v3": 20}, routes)
    assert set(seen) == {"v1", "HTTP 503"}, f"{seen}\n{routes}"
    assert bi.counts("reviews-v2", "reviews-v3") == {"reviews-v2": 0, "reviews-v3": 0}
    no_cluster = await envoy.stats(r"^http\..*\.no_cluster$")
    assert sum(int(v) for v in no_cluster.values()) == seen["HTTP 503"], no_cluster


async def test_wrong_host_on_an_explicit_listener_gets_404_saying_so(
    bookinfo: BookinfoFactory,
) -> None:
    """Explicit mode (bound egress listener, no capture): a Host no service or
    VirtualService matches has nowhere to pass through to, so Envoy answers 404 with
    a body naming the port, not an empty 502 that looks like a failed upstream."""
    bi = await bookinfo()
    for host in ("nosuch", "reviews.elsewhere.example"):
        resp = await bi.call(host, "/reviews/0")
        assert resp.status == 404, f"{host}: {resp.status} {resp.text}\n{await bi.routes()}"
        assert resp.text == (
            "meshpilot: no VirtualService or service matches this Host on port 9080\n"
        )
    # The right Host on the same listener still routes.
    assert (await bi.call("reviews", "/reviews/0")).status == 200
