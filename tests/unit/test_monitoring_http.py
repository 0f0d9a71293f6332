"""The monitoring and debug HTTP server: proxy lookup, field names, times, /metrics."""

from __future__ import annotations

import datetime
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer

from meshpilot.monitoring import http as monitoring_http
from meshpilot.monitoring import metrics
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings
from meshpilot.xds import typeurls
from tests.xds.client import SotwClient

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
WEB = "sidecar~127.0.0.9~web-1.shop~shop.svc.cluster.local"
API = "sidecar~127.0.0.10~api-0.default~default.svc.cluster.local"


class FakeTarget:
    """A Debuggable with two connected proxies and a timestamp in configz."""

    def __init__(self) -> None:
        self.dumped: list[str] = []

    def is_ready(self) -> bool:
        return True

    def sync_status(self) -> list[dict[str, Any]]:
        return []

    def configz(self) -> dict[str, Any]:
        when = datetime.datetime(2026, 12, 4, 17, 3, 0, 250_000, tzinfo=datetime.UTC)
        return {"loaded_at": when}

    def config_dump(self, proxy_id: str) -> dict[str, Any] | None:
        self.dumped.append(proxy_id)
        return {"proxy": proxy_id, "configs": []}

    def proxy_ids(self) -> list[str]:
        return [WEB, API]


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeTarget, TestClient]]:
    target = FakeTarget()
    async with TestClient(TestServer(monitoring_http.build_app(target))) as client:
        yield target, client


@pytest.mark.parametrize(
    ("asked", "node_id"),
    [(WEB, WEB), ("web-1.shop", WEB), ("api-0.default", API), ("api-0", API)],
)
async def test_config_dump_takes_pod_dot_namespace_as_istioctl_does(
    fake: tuple[FakeTarget, TestClient], asked: str, node_id: str
) -> None:
    target, client = fake
    resp = await client.get("/debug/config_dump", params={"proxyID": asked})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["proxy"] == node_id
    assert target.dumped == [node_id]


@pytest.mark.parametrize("asked", ["web-1", "web-1.default", "nobody.shop", "sidecar~x~y~z"])
async def test_config_dump_of_an_unknown_proxy_is_404_with_the_known_ones(
    fake: tuple[FakeTarget, TestClient], asked: str
) -> None:
    _, client = fake
    resp = await client.get("/debug/config_dump", params={"proxyID": asked})
    assert resp.status == 404
    body = await resp.json()
    assert asked in body["error"] and "POD.NAMESPACE" in body["error"]
    assert body["proxies"] == [WEB, API]


async def test_times_in_debug_output_are_rfc3339_utc(
    fake: tuple[FakeTarget, TestClient],
) -> None:
    _, client = fake
    resp = await client.get("/debug/configz")
    assert (await resp.json())["loaded_at"] == "2026-12-04T17:03:00Z"


def test_rfc3339_of_unix_time_and_never() -> None:
    assert monitoring_http.rfc3339(1_796_403_780.9) == "2026-12-04T17:03:00Z"
    assert monitoring_http.rfc3339(0.0) is None
    assert monitoring_http.rfc3339(None) is None


async def test_metrics_have_no_created_series(fake: tuple[FakeTarget, TestClient]) -> None:
    _, client = fake
    # A counter and a histogram with a child each: both would carry *_created.
    metrics.XDS_PUSHES.labels("cds").inc(0)
    metrics.XDS_PUSH_TIME.labels("cds").observe(0.001)
    resp = await client.get("/metrics")
    text = await resp.text()
    assert "pilot_xds_pushes_total{" in text
    assert "pilot_xds_push_time_bucket{" in text
    assert "_created" not in text


# --- a real `meshpilot serve` with an in-process ADS client ------------------------------

SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec:
  ports: [{name: http, port: 9080}]
  selector: {app: reviews}
"""


@pytest.fixture
def config_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "mesh"
    d.mkdir()
    (d / "reviews.yaml").write_text(SERVICE)
    yield d


def _keys(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _keys(v)


async def test_serve_debug_output_snake_case_pod_lookup_and_rfc3339(config_dir: Path) -> None:
    settings = Settings(
        config_dirs=[config_dir],
        xds_address="127.0.0.1:0",
        monitoring_address="127.0.0.1:0",
        debounce_after=0.01,
    )
    server = MeshServer(settings)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.xds_port}")
    ads = SotwClient(channel, WEB)
    try:
        ads.request(typeurls.CLUSTER)
        ads.ack(await ads.recv())
        async with TestClient(TestServer(monitoring_http.build_app(server))) as client:
            resp = await client.get("/debug/syncz")
            (entry,) = await resp.json()
            assert RFC3339_UTC.match(entry["connected_at"]), entry["connected_at"]

            resp = await client.get("/debug/config_dump", params={"proxyID": "web-1.shop"})
            assert resp.status == 200, await resp.text()
            dump = await resp.json()
            assert dump["proxy"] == WEB
            (clusters,) = [c for c in dump["configs"] if "dynamic_active_clusters" in c]
            names = [c["cluster"]["name"] for c in clusters["dynamic_active_clusters"]]
            assert "outbound|9080||reviews.shop.svc.cluster.local" in names
            keys = set(_keys(dump))
            assert "connect_timeout" in keys and "eds_cluster_config" in keys
            camel = sorted(k for k in keys if re.fullmatch(r"[a-z]+(?:[A-Z][a-z0-9]*)+", k))
            assert camel == [], camel

            resp = await client.get("/debug/configz")
            files = (await resp.json())["files"]
            assert RFC3339_UTC.match(files["last_change"]), files
    finally:
        await ads.close()
        await channel.close()
        await server.stop()
