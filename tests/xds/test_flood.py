"""A client flooding the server with names that do not exist (real generator): refused
beyond the per-type limit, answered within it, and nothing it sent stays in the
server's tables or caches once it is gone; other streams are answered meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from meshpilot.api.parse import parse_text
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings
from meshpilot.xds import typeurls
from meshpilot.xds.connection import MAX_NAMES_PER_TYPE
from tests.xds.client import DeltaClient, SotwClient

CDS, EDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.ROUTE
MESH = "".join(
    f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}}}\n"
    f"spec: {{selector: {{app: svc{i}}}, ports: [{{name: http, port: 9080}}]}}\n---\n"
    f"apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
    f"metadata: {{name: svc{i}-a}}\n"
    f"spec: {{address: 10.0.1.{i + 1}, labels: {{app: svc{i}}}}}\n---\n"
    for i in range(3)
)
REAL = [f"outbound|9080||svc{i}.default.svc.cluster.local" for i in range(3)]


@pytest.fixture
async def server() -> AsyncIterator[MeshServer]:
    srv = MeshServer(Settings(xds_address="127.0.0.1:0", monitoring_address="127.0.0.1:0"))
    result = parse_text(MESH, "mesh.yaml")
    assert not result.errors
    for cfg in result.configs:
        srv.store.apply(cfg)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def _sizes(srv: MeshServer) -> dict[str, int]:
    sizes = {f"server.{k}": v for k, v in srv.discovery.table_sizes().items()}
    sizes.update({f"generator.{k}": v for k, v in srv.generator.table_sizes().items()})
    return sizes


def _made_up(round_: int, kind: str, n: int = MAX_NAMES_PER_TYPE) -> list[str]:
    return [f"outbound|80||made-up-{round_}-{kind}-{i}.default.svc.cluster.local" for i in range(n)]


async def test_a_flood_of_unknown_names_leaves_nothing_behind(server: MeshServer) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.xds_port}")
    good = SotwClient(channel, "sidecar~10.1.0.7~good-1.default~default.svc.cluster.local")
    try:
        good.request(CDS)
        good.ack(await good.recv())
        good.request(EDS, REAL[:2])
        eds = await good.recv()
        assert len(eds.resources) == 2
        good.ack(eds, REAL[:2])
        # Sizes after the first round (the probe's shared answer and the attacker's
        # scope are legitimately cached) must not grow with further rounds.
        baseline: dict[str, int] = {}
        for round_ in range(3):
            node = f"sidecar~10.1.0.8~flood-{round_}.default~default.svc.cluster.local"
            sotw = SotwClient(channel, node)
            delta = DeltaClient(channel, node)
            over = SotwClient(channel, node)
            sotw.request(EDS, _made_up(round_, "sotw"))
            delta.request(EDS, _made_up(round_, "delta"))
            over.request(EDS, _made_up(round_, "over", MAX_NAMES_PER_TYPE + 1))
            # Meanwhile another stream is answered.
            probe = SotwClient(
                channel, f"sidecar~10.1.0.9~probe-{round_}.default~default.svc.cluster.local"
            )
            probe.request(EDS, REAL[:1])
            assert len((await probe.recv(within=5)).resources) == 1
            resp = await sotw.recv(within=5)
            assert len(resp.resources) == MAX_NAMES_PER_TYPE  # empty assignments
            sotw.ack(resp, _made_up(round_, "sotw"))
            sotw.request(RDS, [f"route-{round_}-{i}" for i in range(MAX_NAMES_PER_TYPE)])
            assert len((await sotw.recv(within=5)).resources) == MAX_NAMES_PER_TYPE
            assert len((await delta.recv(within=5)).resources) == MAX_NAMES_PER_TYPE
            err = await over.error(within=5)
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert f"at most {MAX_NAMES_PER_TYPE}" in (err.details() or "")
            for c in (sotw, delta, over, probe):
                await c.close()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while len(server.discovery.connections) > 1:
                assert loop.time() < deadline, "streams not closed"
                await asyncio.sleep(0.01)
            sizes = _sizes(server)
            assert sizes["server.interned_subscriptions"] == 0
            assert sizes["generator.host_of"] <= len(REAL)  # only clusters that exist
            assert sizes["generator.eds"] <= len(REAL)
            baseline = baseline or sizes
            assert sizes == baseline
        # The well-behaved proxy is still served: a new name is answered.
        good.request(EDS, REAL, nonce=eds.nonce, version=eds.version_info)
        assert len((await good.recv()).resources) == 1
    finally:
        await good.close()
        await channel.close()
