"""The e2e harness itself: real Envoy from our bootstrap, demo backends, and cleanup."""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.agent.bootstrap import build_bootstrap
from meshpilot.model.proxy import Proxy
from tests.e2e.harness import (
    EnvoyProcess,
    ProcessTracker,
    envoy_validate,
    free_port,
    http_get,
    http_request,
    port_open,
    tcp_roundtrip,
    unique_loopback_ip,
    wait_for,
)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"


def dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_bootstraps_pass_envoy_validate() -> None:
    ip = unique_loopback_ip()
    for doc in (
        build_bootstrap(name="reviews-v1", namespace="default", ip=ip, labels={"app": "r"}),
        build_bootstrap(
            name="gw", namespace="istio-system", proxy_type="router", delta=True, locality="r/z/s"
        ),
        build_bootstrap(name="a", namespace="b", xds_address="localhost:15010", stats_port=15090),
    ):
        assert "OK" in await envoy_validate(doc)


async def test_envoy_starts_without_control_plane_and_keeps_retrying(
    processes: ProcessTracker,
) -> None:
    ip = unique_loopback_ip()
    nobody = f"{ip}:{free_port(ip)}"  # nothing listens here: Envoy must keep trying
    envoy = await processes.envoy(name="productpage-v1", namespace="default", xds_address=nobody)

    ready = await envoy.admin_get("/ready")
    assert (ready.status, ready.text.strip()) == (503, "PRE_INITIALIZING")
    assert await envoy.server_state() == "PRE_INITIALIZING"
    info = await envoy.server_info()
    assert (
        info["node"]["id"] == "sidecar~127.0.0.1~productpage-v1.default~default.svc.cluster.local"
    )
    assert info["command_line_options"]["concurrency"] == 1
    assert await envoy.clusters() == ["xds-grpc"]
    assert await envoy.listeners() == []
    assert await envoy.cluster_hosts("xds-grpc") == [nobody]

    async def retried() -> bool:
        return await envoy.stat("cluster.xds-grpc.upstream_cx_connect_fail") >= 2

    await envoy.wait_for(retried, 10, message="repeated ADS connection attempts")
    stats = await envoy.stats("control_plane")
    assert stats["control_plane.connected_state"] == 0
    dump = await envoy.config_dump("static_clusters")
    assert dump["configs"][0]["cluster"]["name"] == "xds-grpc"
    assert "deprecated" not in envoy.log_text().lower()
    assert "no configured limit" not in envoy.log_text()


class FakeAds:
    """Accepts ADS streams and records the requests; never answers (enough for bootstrap)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []

    def handler(self, method: str, request_type: Any) -> grpc.RpcMethodHandler:
        async def stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            async for request in requests:
                self.requests.append((method, request))

        return grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=request_type.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_envoy_opens_ads_stream_with_istio_node(
    processes: ProcessTracker, delta: bool
) -> None:
    ip = unique_loopback_ip()
    ads = FakeAds()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                ADS_SERVICE,
                {
                    "StreamAggregatedResources": ads.handler(
                        "sotw", discovery_pb2.DiscoveryRequest
                    ),
                    "DeltaAggregatedResources": ads.handler(
                        "delta", discovery_pb2.DeltaDiscoveryRequest
                    ),
                },
            )
        ]
    )
    port = server.add_insecure_port(f"{ip}:0")
    await server.start()
    try:
        envoy = await processes.envoy(
            name="reviews-v2",
            namespace="bookinfo",
            ip=ip,
            labels={"app": "reviews", "version": "v2"},
            xds_address=f"{ip}:{port}",
            delta=delta,
        )
        await envoy.wait_for(lambda: ads.requests, 10, message="a first ADS request")
        method, first = ads.requests[0]
        assert method == ("delta" if delta else "sotw")
        assert first.type_url == "type.googleapis.com/envoy.config.cluster.v3.Cluster"
        proxy = Proxy.from_node(first.node)
        assert proxy.id == f"sidecar~{ip}~reviews-v2.bookinfo~bookinfo.svc.cluster.local"
        assert proxy.labels == {"app": "reviews", "version": "v2"}
        assert proxy.istio_version == "meshpilot-0.1"

        async def connected() -> bool:
            return await envoy.stat("control_plane.connected_state") == 1

        await envoy.wait_for(connected, 5, message="control_plane.connected_state == 1")
    finally:
        await server.stop(0)


async def test_envoy_start_failure_fails_loudly_with_log_tail(tmp_path: Path) -> None:
    doc = build_bootstrap(name="a", namespace="b", admin_port=0)
    doc["static_resources"]["clusters"][0]["connect_timeout"] = "-1s"
    envoy = EnvoyProcess(doc, workdir=tmp_path, start_timeout=10)
    with pytest.raises(pytest.fail.Exception) as failed:
        await envoy.start()
    assert "exited with" in str(failed.value)
    assert "Invalid duration" in str(failed.value)  # Envoy's own complaint, from its log
    assert not envoy.running


async def test_demo_http_answers_and_records(processes: ProcessTracker) -> None:
    ip = unique_loopback_ip()
    reviews = await processes.demo_http(ip, service="reviews", version="v2")
    resp = await http_get(
        f"{reviews.url}/reviews/0?x=1", headers={"Host": "reviews:9080", "end-user": "jason"}
    )
    assert resp.status == 200
    body = resp.json()
    assert body["service"] == "reviews"
    assert body["version"] == "v2"
    assert body["host"] == "reviews:9080"
    assert body["method"] == "GET"
    assert body["path"] == "/reviews/0?x=1"
    assert body["headers"]["end-user"] == "jason"
    assert body["served_by"] == f"{ip}:{reviews.port}"
    assert resp.headers["x-served-by"] == body["served_by"]
    (seen,) = reviews.requests
    assert (seen.host, seen.path, seen.method) == ("reviews:9080", "/reviews/0?x=1", "GET")

    assert (await http_get(f"{reviews.url}/status/503")).status == 503
    assert (await http_get(reviews.url, headers={"x-demo-status": "418"})).status == 418
    post = await http_request("POST", f"{reviews.url}/ratings", data=b'{"stars": 5}')
    assert post.json()["method"] == "POST"
    assert reviews.requests[-1].body == b'{"stars": 5}'
    started = time.monotonic()
    assert (await http_get(f"{reviews.url}/delay/0.2")).status == 200
    assert time.monotonic() - started >= 0.2


async def test_demo_http_keep_alive_fail_first_n_and_upstream_call(
    processes: ProcessTracker,
) -> None:
    ratings = await processes.demo_http(unique_loopback_ip(), service="ratings", fail_first_n=2)
    client_ip = unique_loopback_ip()
    reader, writer = await asyncio.open_connection(*ratings.address, local_addr=(client_ip, 0))
    writer.write(
        b"GET /a HTTP/1.1\r\nHost: ratings\r\n\r\nGET /b HTTP/1.1\r\nHost: ratings\r\n\r\n"
    )
    await writer.drain()
    first = await reader.readuntil(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 503 ")
    writer.close()
    await wait_for(lambda: len(ratings.requests) == 2, 5)
    assert [r.path for r in ratings.requests] == ["/a", "/b"]  # both on one connection
    assert ratings.requests[0].peer.startswith(f"{client_ip}:")

    productpage = await processes.demo_http(
        unique_loopback_ip(), service="productpage", upstream=ratings.url
    )
    resp = await http_get(
        f"{productpage.url}/call/ratings:9080/ratings/0", headers={"x-request-id": "r1"}
    )
    assert resp.status == 200
    upstream = resp.json()["upstream"]
    assert upstream["target"] == "ratings:9080"
    assert upstream["body"]["host"] == "ratings:9080"
    assert upstream["body"]["path"] == "/ratings/0"
    assert ratings.requests[-1].headers["x-request-id"] == "r1"

    await ratings.close()
    resp = await http_get(f"{productpage.url}/call/ratings:9080/")
    assert resp.status == 502
    assert "ConnectionRefusedError" in resp.json()["upstream"]["error"]


async def test_demo_tcp_echo_in_process_and_as_process(processes: ProcessTracker) -> None:
    echo = await processes.demo_tcp_echo(unique_loopback_ip(), prefix="one")
    assert await tcp_roundtrip(*echo.address, b"hello\n", until=b"\n") == b"one hello\n"
    assert await tcp_roundtrip(*echo.address, b"a\nb\n") == b"one a\none b\n"  # half-close
    assert echo.lines == ["hello", "a", "b"]
    assert echo.connections == 2

    ip = unique_loopback_ip()
    port = free_port(ip)
    proc = await processes.demo_tcp_echo_process(ip, port, "two")
    assert await tcp_roundtrip(ip, port, b"x\n", until=b"\n") == b"two x\n"
    assert await proc.stop() == 0  # SIGTERM: clean exit


async def test_demo_http_process_prints_ready_and_exits_cleanly(processes: ProcessTracker) -> None:
    ip = unique_loopback_ip()
    port = free_port(ip)
    proc = await processes.demo_http_process(ip, port, service="details", version="v1")
    assert proc.log_text().splitlines()[0] == "ready"
    body = (await http_get(f"http://{ip}:{port}/details/0")).json()
    assert (body["service"], body["served_by"]) == ("details", f"{ip}:{port}")
    assert await port_open(ip, port)
    proc.kill_now()
    assert proc.returncode == 0
    assert not await port_open(ip, port)


async def test_tracker_kills_everything_even_when_the_test_fails(tmp_path: Path) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(60)"
    )
    ip = unique_loopback_ip()
    with pytest.raises(RuntimeError, match="test body failed"):
        async with ProcessTracker(tmp_path, stop_timeout=0.5) as tracker:
            envoy = await tracker.envoy(name="a", namespace="b", xds_address=f"{ip}:1")
            proc = await tracker.spawn([sys.executable, "-c", stubborn], name="stubborn")
            demo = await tracker.demo_http(ip, service="s")
            pids = [envoy.pid, proc.pid]
            raise RuntimeError("test body failed")
    assert all(dead(pid) for pid in pids)
    assert envoy.returncode == 0  # SIGTERM was enough for Envoy
    assert proc.returncode == -signal.SIGKILL  # ignored SIGTERM, got SIGKILL
    with pytest.raises(OSError):
        await asyncio.open_connection(*demo.address)


async def test_spawn_fails_loudly_when_the_process_dies_before_ready(tmp_path: Path) -> None:
    async with ProcessTracker(tmp_path) as tracker:
        with pytest.raises(pytest.fail.Exception, match="boom"):
            await tracker.spawn(
                [sys.executable, "-c", "import sys; sys.exit('boom')"], name="crasher"
            )


def test_unique_loopback_ips_are_distinct_and_their_block_is_locked() -> None:
    ips = [unique_loopback_ip() for _ in range(300)]
    assert len(set(ips)) == 300
    for ip in ips:
        addr = ipaddress.IPv4Address(ip)
        assert addr in ipaddress.IPv4Network("127.0.0.0/8")
        assert addr not in ipaddress.IPv4Network("127.0.0.0/24")
        assert not ip.endswith((".0", ".255"))
    # A concurrent pytest run would open the same lock file: it must find it taken.
    block = ips[-1].rsplit(".", 1)[0]
    lock = Path(tempfile.gettempdir()) / "meshpilot-loopback-blocks" / f"{block}.lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
