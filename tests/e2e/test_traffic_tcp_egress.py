"""Traffic management: TCP traffic shifting and egress control through real Envoy
sidecars (scenarios 8 and 9)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.bookinfo import (
    Bookinfo,
    BookinfoFactory,
    binomial_tolerance,
    cluster,
    sample,
)
from tests.e2e.harness import ProcessTracker, port_open, unique_loopback_ip

SHIFT_CONNECTIONS = 400
EXTERNAL_HOST = "api.external.test"
EXTERNAL_PORT = 80


@pytest.fixture
async def bookinfo(processes: ProcessTracker, tmp_path: Path) -> AsyncIterator[BookinfoFactory]:
    factory = BookinfoFactory(processes, tmp_path)
    try:
        yield factory
    finally:
        await factory.close()


def tcp_echo_mesh_vs(v1: int, v2: int) -> str:
    """tcp-echo-all-v1.yaml / tcp-echo-20-v2.yaml's routes for the mesh instead of
    the gateway: same shape, `hosts: [tcp-echo]`, `match: port 9000`."""
    return f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: tcp-echo-mesh
spec:
  hosts:
  - tcp-echo
  tcp:
  - match:
    - port: 9000
    route:
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v1
      weight: {v1}
    - destination:
        host: tcp-echo
        port:
          number: 9000
        subset: v2
      weight: {v2}
"""


async def _tcp_routes(bi: Bookinfo) -> str:
    dump = await bi.sidecar().config_dump("dynamic_listeners")
    out = []
    for entry in dump.get("configs", []):
        if not entry.get("name", "").endswith(f"_{9000}"):
            continue
        listener = entry.get("active_state", {}).get("listener", {})
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                cfg = f.get("typed_config", {})
                out.append(f"{entry['name']}: {cfg.get('cluster') or cfg.get('weighted_clusters')}")
    return "\n".join(out)


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_8_tcp_traffic_shifting(bookinfo: BookinfoFactory, delta: bool) -> None:
    # tcp-echo-all-v1.yaml unchanged: its DestinationRule (subsets v1, v2) applies to
    # the mesh; its Gateway and gateway-bound VirtualService must not touch sidecars.
    bi = await bookinfo(delta=delta, files=[sample("tcp-echo/tcp-echo-all-v1.yaml")])
    before = await bi.tcp_versions(60)
    assert set(before) == {"one", "two"}, f"{before}\n{await _tcp_routes(bi)}"

    await bi.apply(("tcp-echo-mesh.yaml", tcp_echo_mesh_vs(100, 0)))
    v2_connections = bi.app("tcp-echo-v2").connections
    seen = await bi.tcp_versions(100)
    assert seen == Counter({"one": 100}), f"{seen}\n{await _tcp_routes(bi)}"
    assert bi.app("tcp-echo-v2").connections == v2_connections

    await bi.apply(("tcp-echo-mesh.yaml", tcp_echo_mesh_vs(80, 20)))
    seen = await bi.tcp_versions(SHIFT_CONNECTIONS)
    routes = await _tcp_routes(bi)
    assert set(seen) <= {"one", "two"}, f"{seen}\n{routes}"
    tol = binomial_tolerance(SHIFT_CONNECTIONS, 0.2)
    assert abs(seen["two"] - SHIFT_CONNECTIONS * 0.2) <= tol, f"{seen} (+-{tol:.0f})\n{routes}"
    # The subsets are Istio's cluster names, with one endpoint each.
    envoy = bi.sidecar()
    for version in ("v1", "v2"):
        hosts = await envoy.cluster_hosts(cluster("tcp-echo", 9000, version))
        assert hosts == [f"{bi.workloads['tcp-echo-' + version].address}:9000"]


REGISTRY_ONLY = "outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"


def external_service_entry(address: str, port: int) -> str:
    return f"""apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-api
spec:
  hosts:
  - {EXTERNAL_HOST}
  location: MESH_EXTERNAL
  ports:
  - number: {EXTERNAL_PORT}
    name: http
    protocol: HTTP
  resolution: STATIC
  endpoints:
  - address: {address}
    ports:
      http: {port}
"""


EXTERNAL_TIMEOUT_VS = f"""apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: external-api
spec:
  hosts:
  - {EXTERNAL_HOST}
  http:
  - timeout: 3s
    route:
    - destination:
        host: {EXTERNAL_HOST}
      weight: 100
"""


async def test_9_egress_registry_only_service_entry_and_timeout(
    bookinfo: BookinfoFactory, processes: ProcessTracker
) -> None:
    """Istio's egress-control task: REGISTRY_ONLY, a ServiceEntry for an external HTTP
    host (a demo app on a loopback address stands in for it), then a 3 s timeout."""
    external = await processes.demo_http(unique_loopback_ip(), 0, service="external-api")
    bi = await bookinfo(mesh_config=REGISTRY_ONLY)
    egress = bi.egress()

    # Unknown to the mesh: refused. On the HTTP port the sidecar already listens on,
    # Istio's block_all answers 502; on the external port nothing listens at all.
    resp = await bi.call(EXTERNAL_HOST, "/get")
    assert resp.status == 502, f"{resp.status} {resp.text}\n{await bi.routes()}"
    assert "block_all" in await bi.routes(name="9080")
    assert "allow_any" not in await bi.routes()
    assert not await port_open(egress, EXTERNAL_PORT)
    assert external.requests == []

    # Registered with a ServiceEntry: reachable, through a listener for its port.
    await bi.apply(("external-se.yaml", external_service_entry(external.host, external.port)))
    name = f"outbound|{EXTERNAL_PORT}||{EXTERNAL_HOST}"
    assert name in await bi.cluster_names()
    assert await bi.sidecar().cluster_hosts(name) == [external.served_by]
    resp = await bi.call(EXTERNAL_HOST, "/get", port=EXTERNAL_PORT)
    assert resp.status == 200, f"{resp.status} {resp.text}\n{await bi.routes()}"
    assert external.requests[-1].host == f"{EXTERNAL_HOST}:{EXTERNAL_PORT}"
    assert external.requests[-1].path == "/get"
    # Still nothing for other unknown hosts.
    resp = await bi.call("unknown.external.test", "/get", port=EXTERNAL_PORT)
    assert resp.status == 502, f"{resp.status} {resp.text}"

    # A VirtualService timeout of 3 s: a 5 s answer becomes a 504 after about 3 s,
    # while a 1 s answer is unaffected.
    await bi.apply(("external-vs.yaml", EXTERNAL_TIMEOUT_VS))
    routes = await bi.routes(name=str(EXTERNAL_PORT))
    (slow, slow_took), (fast, fast_took) = await asyncio.gather(
        bi.timed_call(EXTERNAL_HOST, "/delay/5", port=EXTERNAL_PORT, timeout=10, fresh=True),
        bi.timed_call(EXTERNAL_HOST, "/delay/1", port=EXTERNAL_PORT, timeout=10, fresh=True),
    )
    assert slow.status == 504, f"{slow.status} after {slow_took:.2f}s: {slow.text}\n{routes}"
    assert 2.9 <= slow_took < 4.0, f"504 after {slow_took:.2f}s\n{routes}"
    assert fast.status == 200 and 1.0 <= fast_took < 2.5, f"{fast.status} {fast_took:.2f}s"
