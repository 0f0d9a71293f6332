"""Traffic management, resilience: fault injection, timeouts, retries and circuit
breaking through real Envoy sidecars (scenarios 4, 5, 6 and 7)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.bookinfo import (
    Bookinfo,
    BookinfoFactory,
    cluster,
    cluster_stat,
    sample,
    workload_entry_yaml,
)
from tests.e2e.harness import ProcessTracker, unique_loopback_ip, wait_for

DR_ALL = "bookinfo/networking/destination-rule-all.yaml"
JASON = {"end-user": "jason"}


@pytest.fixture
async def bookinfo(processes: ProcessTracker, tmp_path: Path) -> AsyncIterator[BookinfoFactory]:
    factory = BookinfoFactory(processes, tmp_path)
    try:
        yield factory
    finally:
        await factory.close()


async def _fault_stats(bi: Bookinfo, via: str = "productpage-v1") -> dict[str, int]:
    stats = await bi.sidecar(via).stats(r"\.fault\.(delays|aborts)_injected$")
    return {k: int(v) for k, v in stats.items() if isinstance(v, int)}


async def test_4_fault_injection_delay_then_abort_for_jason(bookinfo: BookinfoFactory) -> None:
    """virtual-service-ratings-test-delay.yaml, then -abort.yaml, as in Istio's
    fault-injection task; the 7 s delay runs while the abort is checked."""
    delay = sample("bookinfo/networking/virtual-service-ratings-test-delay.yaml")
    abort = sample("bookinfo/networking/virtual-service-ratings-test-abort.yaml")
    bi = await bookinfo(files=[sample(DR_ALL), delay])
    ratings = bi.app("ratings-v1")
    routes = await bi.routes(name="9080")

    t0 = time.monotonic()
    delayed = asyncio.create_task(
        bi.timed_call("ratings", "/ratings/jason-delayed", headers=JASON, timeout=20, fresh=True)
    )
    # Everybody else is answered at once.
    for headers in ({}, {"end-user": "alice"}):
        resp, took = await bi.timed_call("ratings", "/ratings/0", headers=headers)
        assert resp.status == 200, f"{resp.status} {resp.text}\n{routes}"
        assert took < 1.5, f"{headers}: {took:.2f}s\n{routes}"
    assert not delayed.done(), f"jason was not delayed: {delayed}\n{routes}"
    await asyncio.sleep(0.5)
    assert "/ratings/jason-delayed" not in ratings.paths(), "the delay happens before ratings"

    # Swap the delay for the abort while jason's request is still held.
    await bi.apply(abort, remove=[delay])
    assert time.monotonic() - t0 < 6.5, "too slow to check the abort under the delay"
    before = len(ratings.requests)
    for _ in range(3):
        resp = await bi.call("ratings", "/ratings/jason-aborted", headers=JASON)
        assert resp.status == 500, f"{resp.status} {resp.text}\n{await bi.routes(name='9080')}"
    assert len(ratings.requests) == before, "an aborted request must not reach ratings"
    assert "/ratings/jason-aborted" not in ratings.paths()
    resp = await bi.call("ratings", "/ratings/0", headers={"end-user": "alice"})
    assert resp.status == 200

    resp, took = await delayed
    assert resp.status == 200, resp.text
    assert resp.json()["version"] == "v1"
    # Envoy's timers have millisecond resolution and may fire a hair early.
    assert 6.95 <= took < 9.0, f"jason waited {took:.2f}s"
    arrived = [r for r in ratings.requests if r.path == "/ratings/jason-delayed"]
    assert len(arrived) == 1 and arrived[0].time - t0 >= 6.95
    stats = await _fault_stats(bi)
    assert sum(v for k, v in stats.items() if k.endswith("delays_injected")) == 1, stats
    assert sum(v for k, v in stats.items() if k.endswith("aborts_injected")) == 3, stats


async def test_5_reviews_timeout_cuts_a_slow_ratings_call(bookinfo: BookinfoFactory) -> None:
    """Istio's request-timeouts task: productpage -> reviews (routed to v2, timeout
    0.5 s) -> reviews-v2 calls ratings through its own sidecar -> ratings delayed 2 s."""
    ratings_delay = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - fault:
      delay:
        percentage:
          value: 100
        fixedDelay: 2s
    route:
    - destination:
        host: ratings
        subset: v1
"""
    reviews_timeout = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
    timeout: 0.5s
"""
    bi = await bookinfo(
        files=[
            sample(DR_ALL),
            ("ratings-delay.yaml", ratings_delay),
            ("reviews-timeout.yaml", reviews_timeout),
        ],
        sidecars=("productpage-v1", "reviews-v2"),
    )
    routes = await bi.routes(name="9080")
    chained, direct = await asyncio.gather(
        bi.timed_call("reviews", "/call/ratings:9080/ratings/chained", timeout=10, fresh=True),
        # Without a timeout on the way, the delay is there: about 2 s.
        bi.timed_call("ratings", "/ratings/direct", timeout=10, fresh=True),
    )
    resp, took = chained
    assert resp.status == 504, f"{resp.status} after {took:.2f}s: {resp.text}\n{routes}"
    assert 0.45 <= took < 1.5, f"504 after {took:.2f}s\n{routes}"
    assert "upstream request timeout" in resp.text
    resp, took = direct
    assert resp.status == 200 and took >= 1.95, f"{resp.status} after {took:.2f}s\n{routes}"

    # The request did reach reviews v2 (the subset), whose call to ratings went through
    # its own sidecar and its 2 s delay, after the caller had given up.
    assert [r.path for r in bi.app("reviews-v2").requests] == ["/call/ratings:9080/ratings/chained"]
    assert bi.counts("reviews-v1", "reviews-v3") == {"reviews-v1": 0, "reviews-v3": 0}
    await wait_for(
        lambda: "/ratings/chained" in bi.app("ratings-v1").paths(),
        3.0,
        message="reviews-v2's call to reach ratings through its sidecar",
    )
    timeouts = await cluster_stat(
        bi.sidecar(), cluster("reviews", subset="v2"), "upstream_rq_timeout"
    )
    assert timeouts == 1
    delays = await _fault_stats(bi, "reviews-v2")
    assert sum(delays.values()) == 1, delays


async def test_6_retries_on_5xx(bookinfo: BookinfoFactory) -> None:
    """`retries: {attempts: 3, retryOn: 5xx}`: a backend that fails twice is answered
    on the third request; one that fails four times exhausts the three retries (Istio's
    default of two retries would stop one request earlier)."""
    retries = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {host}
spec:
  hosts:
  - {host}
  http:
  - route:
    - destination:
        host: {host}
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: 5xx
"""
    bi = await bookinfo(
        files=[
            ("ratings-retries.yaml", retries.format(host="ratings")),
            ("details-retries.yaml", retries.format(host="details")),
        ],
        app_options={"ratings-v1": {"fail_first_n": 2}, "details-v1": {"fail_first_n": 4}},
    )
    routes = await bi.routes(name="9080")
    recovered, exhausted = await asyncio.gather(
        bi.call("ratings", "/ratings/0"), bi.call("details", "/details/0")
    )
    ratings = bi.app("ratings-v1").requests
    assert recovered.status == 200, f"{recovered.status} {recovered.text}\n{routes}"
    assert len(ratings) == 3, f"ratings saw {len(ratings)} requests\n{routes}"
    assert [r.headers.get("x-envoy-attempt-count") for r in ratings] == ["1", "2", "3"]
    details = bi.app("details-v1").requests
    assert exhausted.status == 503, f"{exhausted.status} {exhausted.text}\n{routes}"
    assert len(details) == 4, f"details saw {len(details)} requests\n{routes}"
    envoy = bi.sidecar()
    assert await cluster_stat(envoy, cluster("ratings"), "upstream_rq_retry") == 2
    assert await cluster_stat(envoy, cluster("details"), "upstream_rq_retry") == 3
    exceeded = await cluster_stat(envoy, cluster("details"), "upstream_rq_retry_limit_exceeded")
    assert exceeded == 1


async def test_7_circuit_breaking(bookinfo: BookinfoFactory, processes: ProcessTracker) -> None:
    """Istio's circuit-breaking task: httpbin (Istio's httpbin.yaml unchanged, the
    demo app standing in), its DestinationRule, 3 concurrent clients x 30 requests."""
    httpbin_dr = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"""
    # httpbin.yaml's Service: port 8000, targetPort 8080, where the app listens.
    httpbin = await processes.demo_http(unique_loopback_ip(), 8080, service="httpbin")
    entry = workload_entry_yaml("httpbin", httpbin.host, {"app": "httpbin", "version": "v1"})
    bi = await bookinfo(
        files=[
            sample("httpbin/httpbin.yaml"),
            ("httpbin-workload.yaml", entry),
            ("httpbin-dr.yaml", httpbin_dr),
        ]
    )
    name = cluster("httpbin", 8000)
    envoy = bi.sidecar()
    assert await envoy.cluster_hosts(name) == [httpbin.served_by]

    async def client() -> list[int]:
        # Requests back to back, like `fortio load -c 3 -qps 0 -n 90`.
        out = []
        for _ in range(30):
            resp = await bi.call("httpbin", "/delay/0.05", port=8000)
            out.append(resp.status)
        return out

    statuses = Counter(s for c in await asyncio.gather(*(client() for _ in range(3))) for s in c)
    overflow = await cluster_stat(envoy, name, "upstream_rq_pending_overflow")
    cx_overflow = await cluster_stat(envoy, name, "upstream_cx_overflow")
    detail = f"{statuses}, pending_overflow={overflow}, cx_overflow={cx_overflow}"
    assert set(statuses) <= {200, 503}, detail
    assert statuses[503] > 0 and statuses[200] > 0, detail
    assert overflow > 0, detail
    # Every 503 is Envoy's overflow, none was the backend's: it saw only the 200s.
    assert len(httpbin.requests) == statuses[200], detail
    print(f"circuit breaking: {detail}")
