"""Endpoint pushes in a mesh of Sidecars: every proxy whose scope has the changed host
gets its new ClusterLoadAssignment in the push for that change.

Three namespaces whose Sidecars each import their own and the next namespace, so the
scopes differ and a change reaches two of them; each proxy is the sidecar of one of
the WorkloadEntries (its IP, namespace and labels), so it has service instances like
a real sidecar. Real pipeline: store -> debounced push -> translators -> SotW ADS.
Proxies of the third namespace must get nothing for the change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from meshpilot.api.parse import parse_text
from meshpilot.config import Config
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings
from meshpilot.xds import typeurls
from tests.xds.client import SotwClient

NAMESPACES = ("ns-a", "ns-b", "ns-c")
ENDPOINTS = 3
# The last entry of each service is no proxy's own workload; it is the one that moves.
MOVED = ENDPOINTS - 1


def _address(ns: int, endpoint: int, move: int = 0) -> str:
    return f"10.{ns + 1}.{move}.{endpoint + 1}"


def _sidecar(ns: str, other: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\n"
        f"metadata: {{name: default, namespace: {ns}}}\n"
        f"spec: {{egress: [{{hosts: ['./*', '{other}/*']}}]}}\n"
    )


def _service(ns: str) -> str:
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: svc, namespace: {ns}}}\n"
        "spec: {selector: {app: svc}, ports: [{name: http, port: 9080}]}\n"
    )


def _entry(ns: int, endpoint: int, move: int = 0) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        f"metadata: {{name: svc-{endpoint}, namespace: {NAMESPACES[ns]}}}\n"
        f"spec: {{address: {_address(ns, endpoint, move)}, labels: {{app: svc}}}}\n"
    )


def _configs(text: str) -> list[Config]:
    result = parse_text(text, "mesh.yaml")
    assert not result.errors
    return list(result.configs)


def _cluster(ns: str) -> str:
    return f"outbound|9080||svc.{ns}.svc.cluster.local"


@pytest.fixture
async def server() -> AsyncIterator[MeshServer]:
    srv = MeshServer(
        Settings(xds_address="127.0.0.1:0", monitoring_address="127.0.0.1:0", debounce_after=0.02)
    )
    docs = []
    for i, ns in enumerate(NAMESPACES):
        docs += [_sidecar(ns, NAMESPACES[(i + 1) % len(NAMESPACES)]), _service(ns)]
        docs += [_entry(i, e) for e in range(ENDPOINTS)]
    for cfg in _configs("---\n".join(docs)):
        srv.store.apply(cfg)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


class Sidecar:
    """A SotW client that is the sidecar of WorkloadEntry `endpoint` of namespace `ns`,
    subscribed to CDS and to EDS for every EDS cluster, as Envoy does."""

    def __init__(self, channel: grpc.aio.Channel, ns: int, endpoint: int) -> None:
        self.namespace = NAMESPACES[ns]
        ip = _address(ns, endpoint)
        node_id = f"sidecar~{ip}~svc-{endpoint}.{self.namespace}~{self.namespace}.svc.cluster.local"
        metadata = {"NAMESPACE": self.namespace, "LABELS": {"app": "svc"}}
        self.client = SotwClient(channel, node_id, metadata)
        self.clusters: list[str] = []

    async def sync(self) -> None:
        c = self.client
        c.request(typeurls.CLUSTER)
        cds = await c.recv()
        assert cds.type_url == typeurls.CLUSTER
        c.ack(cds)
        self.clusters = sorted(
            r.name
            for r in (cluster_pb2.Cluster.FromString(a.value) for a in cds.resources)
            if r.type == cluster_pb2.Cluster.EDS
        )
        c.request(typeurls.ENDPOINT, self.clusters)
        eds = await c.recv()
        assert eds.type_url == typeurls.ENDPOINT
        c.ack(eds, self.clusters)

    async def next_assignments(self) -> dict[str, list[str]]:
        """The next EDS response (ACKed): cluster name -> endpoint addresses."""
        resp = await self.client.recv()
        assert resp.type_url == typeurls.ENDPOINT
        self.client.ack(resp, self.clusters)
        out = {}
        for a in resp.resources:
            cla = endpoint_pb2.ClusterLoadAssignment.FromString(a.value)
            out[cla.cluster_name] = sorted(
                lb.endpoint.address.socket_address.address
                for group in cla.endpoints
                for lb in group.lb_endpoints
            )
        return out


async def test_every_sidecar_that_sees_the_host_gets_each_endpoint_change_in_its_push(
    server: MeshServer,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.xds_port}") as channel:
        n = len(NAMESPACES)
        proxies = [Sidecar(channel, ns, e) for ns in range(n) for e in range(MOVED)]
        try:
            for i, p in enumerate(proxies):
                await p.sync()
                ns = i // MOVED
                assert p.clusters == sorted(_cluster(NAMESPACES[k]) for k in (ns, (ns + 1) % n))
            for move in range(1, 7):
                ns = move % n
                (moved,) = _configs(_entry(ns, MOVED, move))
                server.store.apply(moved)
                want = sorted([*(_address(ns, e) for e in range(MOVED)), _address(ns, MOVED, move)])
                for p in proxies:
                    if _cluster(NAMESPACES[ns]) not in p.clusters:
                        continue
                    # The next response, before any later change: this change's push.
                    got = await p.next_assignments()
                    assert got.get(_cluster(NAMESPACES[ns])) == want, (move, p.namespace)
            # Nothing else was sent, to these or to the proxies that do not see the host.
            for p in proxies:
                await p.client.expect_nothing()
        finally:
            for p in proxies:
                await p.client.close()
