"""The whole pipeline without Envoy: store change -> debounced push -> real translators ->
ADS client. Endpoint-only changes must move only the ClusterLoadAssignments that changed."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)

from meshpilot.api.parse import parse_text
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings
from meshpilot.xds import typeurls
from tests.xds.client import DeltaClient, SotwClient

SERVICES = 5


def _objects(address_of_svc0: str = "10.0.0.1") -> str:
    docs = []
    for i in range(SERVICES):
        addr = address_of_svc0 if i == 0 else f"10.0.1.{i}"
        docs.append(
            f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc{i}}}\n"
            f"spec: {{selector: {{app: svc{i}}}, ports: [{{name: http, port: 9080}}]}}\n---\n"
            f"apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
            f"metadata: {{name: svc{i}-a}}\nspec: {{address: {addr}, labels: {{app: svc{i}}}}}\n"
        )
    return "---\n".join(docs)


@pytest.fixture
async def server() -> AsyncIterator[MeshServer]:
    srv = MeshServer(
        Settings(xds_address="127.0.0.1:0", monitoring_address="127.0.0.1:0", debounce_after=0.02)
    )
    result = parse_text(_objects(), "mesh.yaml")
    assert not result.errors
    for cfg in result.configs:
        srv.store.apply(cfg)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


def _route_names(resp) -> list[str]:  # type: ignore[no-untyped-def]
    names = set()
    for any_msg in resp.resources:
        listener = listener_pb2.Listener.FromString(any_msg.value)
        for chain in listener.filter_chains:
            for f in chain.filters:
                if f.typed_config.type_url.endswith("HttpConnectionManager"):
                    hcm = hcm_pb2.HttpConnectionManager.FromString(f.typed_config.value)
                    if hcm.HasField("rds"):
                        names.add(hcm.rds.route_config_name)
    return sorted(names)


def _eds_clusters(resp) -> list[str]:  # type: ignore[no-untyped-def]
    out = []
    for any_msg in resp.resources:
        c = cluster_pb2.Cluster.FromString(any_msg.value)
        if c.type == cluster_pb2.Cluster.EDS:
            out.append(c.name)
    return sorted(out)


async def test_sotw_endpoint_change_sends_only_the_changed_load_assignment(
    server: MeshServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.xds_port}") as channel:
        client = SotwClient(channel)
        client.request(typeurls.CLUSTER)
        cds = await client.recv()
        client.ack(cds)
        clusters = _eds_clusters(cds)
        assert len(clusters) == SERVICES
        client.request(typeurls.ENDPOINT, clusters)
        eds = await client.recv()
        assert len(eds.resources) == SERVICES
        client.ack(eds, clusters)
        client.request(typeurls.LISTENER)
        lds = await client.recv()
        client.ack(lds)
        routes = _route_names(lds)
        assert routes == ["9080"]
        client.request(typeurls.ROUTE, routes)
        rds = await client.recv()
        client.ack(rds, routes)
        await client.expect_nothing()

        moved = parse_text(_objects("10.9.9.9"), "mesh.yaml").configs
        server.store.apply(next(c for c in moved if c.name == "svc0-a"))
        push = await client.recv()
        assert push.type_url == typeurls.ENDPOINT
        assert len(push.resources) == 1
        cla = endpoint_pb2.ClusterLoadAssignment.FromString(push.resources[0].value)
        assert cla.cluster_name == "outbound|9080||svc0.default.svc.cluster.local"
        address = cla.endpoints[0].lb_endpoints[0].endpoint.address.socket_address.address
        assert address == "10.9.9.9"
        client.ack(push, clusters)
        await client.expect_nothing()  # no CDS, LDS or RDS for an endpoint move
        await client.close()


async def test_delta_endpoint_change_sends_only_the_changed_load_assignment(
    server: MeshServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.xds_port}") as channel:
        client = DeltaClient(channel)
        client.request(typeurls.CLUSTER)
        cds = await client.recv()
        client.ack(cds)
        clusters = sorted(
            r.name
            for r in cds.resources
            if cluster_pb2.Cluster.FromString(r.resource.value).type == cluster_pb2.Cluster.EDS
        )
        client.request(typeurls.ENDPOINT, clusters)
        eds = await client.recv()
        assert len(eds.resources) == SERVICES
        versions = {r.name: r.version for r in eds.resources}
        client.ack(eds)
        await client.expect_nothing()

        moved = parse_text(_objects("10.9.9.9"), "mesh.yaml").configs
        server.store.apply(next(c for c in moved if c.name == "svc0-a"))
        push = await client.recv()
        assert push.type_url == typeurls.ENDPOINT
        assert [r.name for r in push.resources] == ["outbound|9080||svc0.default.svc.cluster.local"]
        assert push.resources[0].version != versions[push.resources[0].name]
        assert not push.removed_resources
        client.ack(push)
        await client.expect_nothing()
        await client.close()


async def test_service_change_is_a_full_push(server: MeshServer) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.xds_port}") as channel:
        client = SotwClient(channel)
        client.request(typeurls.CLUSTER)
        cds = await client.recv()
        client.ack(cds)
        client.request(typeurls.LISTENER)
        lds = await client.recv()
        client.ack(lds)
        await client.expect_nothing()
        extra = parse_text(
            "apiVersion: v1\nkind: Service\nmetadata: {name: newsvc}\n"
            "spec: {selector: {app: n}, ports: [{name: http, port: 9091}]}\n",
            "new.yaml",
        ).configs[0]
        server.store.apply(extra)
        cds2 = await client.recv()
        assert cds2.type_url == typeurls.CLUSTER
        assert "outbound|9091||newsvc.default.svc.cluster.local" in _eds_clusters(cds2)
        client.ack(cds2)
        lds2 = await client.recv()  # a new port means a new listener; unchanged LDS is not resent
        assert lds2.type_url == typeurls.LISTENER
        assert len(lds2.resources) == len(lds.resources) + 1
        client.ack(lds2)
        await client.expect_nothing()
        await client.close()


async def test_starting_a_server_leaves_the_garbage_collector_alone() -> None:
    # gc.freeze() is process-wide: only the `serve` command may tune it, not start().
    srv = MeshServer(Settings(xds_address="127.0.0.1:0", monitoring_address="127.0.0.1:0"))
    frozen, threshold = gc.get_freeze_count(), gc.get_threshold()
    await srv.start()
    try:
        assert gc.get_freeze_count() == frozen
        assert gc.get_threshold() == threshold
    finally:
        await srv.stop()
