"""Hostile or broken ADS clients: oversized and undecodable requests, floods of names,
huge node metadata, abrupt disconnects. The server must refuse cleanly, keep its memory
bounded and keep answering everyone else."""

from __future__ import annotations

import grpc

from tests.xds.client import names_of
from tests.xds.conftest import CDS, EDS, Harness


async def test_a_request_over_the_receive_limit_is_refused_by_grpc(harness: Harness) -> None:
    c = harness.sotw()
    c.request(EDS, [f"cluster-{i:07d}-" + "x" * 40 for i in range(120_000)])  # ~6 MiB
    err = await c.error()
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not harness.discovery.connections
    other = harness.sotw()
    other.request(CDS)
    assert names_of(await other.recv()) == ["a", "b", "c"]
