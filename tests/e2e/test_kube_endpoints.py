"""End to end: a real Envoy follows a Kubernetes Service's EndpointSlices, and its own
Pod's labels (not its bootstrap's) choose its Sidecar.

EndpointSlices and Pods are applied to the store of an in-process `meshpilot serve`
as the Kubernetes source stores them (converted by its converter from API-server
objects); the Service and the client's Sidecar come from the config directory.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from meshpilot.config import Config, ConfigKey
from meshpilot.discovery.kube.convert import to_config
from tests.e2e.harness import (
    DemoServer,
    EnvoyProcess,
    ProcessTracker,
    http_get,
    unique_loopback_ip,
    wait_for,
)
from tests.e2e.mesh import Mesh, egress_sidecar_yaml, service_yaml

CLUSTER = "outbound|9080||reviews.default.svc.cluster.local"
SLICE = ConfigKey("EndpointSlice", "default", "reviews-x7k2p")


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    config = tmp_path / "config"
    config.mkdir()
    m = Mesh(config, debounce_after=0.05)
    try:
        yield m
    finally:
        await m.stop()


def _convert(kind: str, obj: dict[str, Any]) -> Config:
    cfg = to_config(kind, obj, "Kubernetes")
    assert isinstance(cfg, Config), str(cfg)
    return cfg


def _pod(name: str, ip: str, app: str = "reviews") -> Config:
    return _convert(
        "Pod",
        {
            "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
            "spec": {"serviceAccountName": "reviews", "nodeName": "node-1"},
            "status": {"podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": "True"}]},
        },
    )


def _slice(*endpoints: tuple[str, str, dict[str, bool]]) -> Config:
    """Endpoints as (pod, ip, conditions); the slice port is the backends' 9080."""
    return _convert(
        "EndpointSlice",
        {
            "metadata": {
                "name": SLICE.name,
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "reviews"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": [ip],
                    "conditions": conditions,
                    "targetRef": {"kind": "Pod", "namespace": "default", "name": pod},
                }
                for pod, ip, conditions in endpoints
            ],
            "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
        },
    )


async def _answer(client_ip: str) -> int:
    try:
        resp = await http_get(
            f"http://{client_ip}:9080/hello", headers={"Host": "reviews:9080"}, timeout=2
        )
    except (OSError, TimeoutError):
        return 0
    return resp.status


async def _served_by(backend: DemoServer, client_ip: str) -> bool:
    before = len(backend.requests)
    return await _answer(client_ip) == 200 and len(backend.requests) > before


async def _hosts_are(envoy: EnvoyProcess, expected: list[str]) -> bool:
    return sorted(await envoy.cluster_hosts(CLUSTER)) == sorted(expected)


async def test_envoy_follows_endpoint_slice_changes(processes: ProcessTracker, mesh: Mesh) -> None:
    client_ip, ip1, ip2 = (unique_loopback_ip() for _ in range(3))
    backend1 = await processes.demo_http(ip1, 9080, service="reviews", version="v1")
    backend2 = await processes.demo_http(ip2, 9080, service="reviews", version="v2")
    mesh.write("reviews.yaml", service_yaml("reviews"))
    mesh.write("client.yaml", egress_sidecar_yaml("client", "client", client_ip))
    store = mesh.server.store
    store.apply(_pod("reviews-1", ip1))
    store.apply(_pod("reviews-2", ip2))
    store.apply(_slice(("reviews-1", ip1, {"ready": True})))
    # The client's own Pod: its labels, not the bootstrap's, pick the client Sidecar
    # (and with it the egress listener the requests below go through).
    store.apply(_pod("client", client_ip, app="client"))
    await mesh.start()
    envoy = await processes.envoy(
        name="client",
        namespace="default",
        ip=client_ip,
        labels={"app": "not-the-pods-label"},
        xds_address=mesh.xds_address,
    )
    await envoy.wait_live()
    await mesh.wait_synced(envoy)
    assert await envoy.cluster_hosts(CLUSTER) == [f"{ip1}:9080"]
    assert await _served_by(backend1, client_ip)

    timings: dict[str, float] = {}

    async def change(what: str, cfg: Config | None, check: Any) -> None:
        t0 = time.monotonic()
        if cfg is None:
            store.delete(SLICE)
        else:
            store.apply(cfg)
        await wait_for(check, 1.0, interval=0.02)
        timings[what] = time.monotonic() - t0

    # The endpoint moves to the other Pod.
    await change(
        "move",
        _slice(("reviews-2", ip2, {"ready": True})),
        lambda: _served_by(backend2, client_ip),
    )
    # Not ready: out of the load assignment, Envoy has no host left.
    await change(
        "not ready",
        _slice(("reviews-2", ip2, {"ready": False})),
        lambda: _hosts_are(envoy, []),
    )
    assert await _answer(client_ip) == 503
    # Both ready, then the second terminating (still serving): only the first is used.
    await change(
        "both ready",
        _slice(("reviews-1", ip1, {"ready": True}), ("reviews-2", ip2, {"ready": True})),
        lambda: _hosts_are(envoy, [f"{ip1}:9080", f"{ip2}:9080"]),
    )
    await change(
        "terminating",
        _slice(
            ("reviews-1", ip1, {"ready": True}),
            ("reviews-2", ip2, {"ready": False, "serving": True, "terminating": True}),
        ),
        lambda: _hosts_are(envoy, [f"{ip1}:9080"]),
    )
    counts = len(backend2.requests)
    for _ in range(5):
        assert await _answer(client_ip) == 200
    assert len(backend2.requests) == counts
    # The slice goes: no endpoints, no backend sees traffic.
    await change("deleted", None, lambda: _hosts_are(envoy, []))
    before = (len(backend1.requests), len(backend2.requests))
    assert await _answer(client_ip) == 503
    assert (len(backend1.requests), len(backend2.requests)) == before
    print("EndpointSlice change to Envoy:", {k: f"{v * 1000:.0f} ms" for k, v in timings.items()})
