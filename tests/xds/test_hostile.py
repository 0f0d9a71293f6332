"""Hostile or broken ADS clients: oversized and undecodable requests, floods of names,
huge node metadata, abrupt disconnects. The server must refuse cleanly, keep its memory
bounded and keep answering everyone else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.monitoring import metrics
from meshpilot.xds.server import SERVICE_NAME, DiscoveryServer
from tests.xds.client import SotwClient, names_of, node
from tests.xds.conftest import (
    CDS,
    EDS,
    Harness,
    Logs,
    default_generator,
    eventually,
    start_harness,
)
from tests.xds.fake_generator import FakeContext, FakeGenerator


async def test_a_request_over_the_receive_limit_is_refused_by_grpc(harness: Harness) -> None:
    c = harness.sotw()
    c.request(EDS, [f"cluster-{i:07d}-" + "x" * 40 for i in range(120_000)])  # ~6 MiB
    err = await c.error()
    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not harness.discovery.connections
    other = harness.sotw()
    other.request(CDS)
    assert names_of(await other.recv()) == ["a", "b", "c"]


async def test_client_text_in_logs_and_status_is_truncated(
    harness: Harness, xds_logs: Logs
) -> None:
    huge_id = "sidecar~10.1.0.7~" + "p" * 2_000_000 + ".default~default.svc.cluster.local"
    c = harness.sotw(huge_id)
    c.request(CDS)
    err = await c.error()
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "node.id" in (err.details() or "")
    assert len(err.details() or "") < 1024
    # A valid proxy that sends junk type URLs and a huge NACK message.
    ok = harness.sotw()
    ok.request(CDS)
    resp = await ok.recv()
    for i in range(40):
        ok.request(f"type.googleapis.com/junk.{i}." + "t" * 100_000)
    ok.nack(resp, "bad cluster " + "e" * 1_000_000)
    await harness.settled()
    await eventually(lambda: bool(xds_logs.named("xds nack")))
    unknown = xds_logs.named("xds unknown type ignored")
    assert 0 < len(unknown) <= 16
    assert xds_logs.lines
    assert max(len(line) for line in xds_logs.lines) < 4096
    nack = harness.status()["cluster_nack"]
    assert isinstance(nack, str) and nack.startswith("bad cluster ") and len(nack) < 2048


async def test_istio_version_labels_stay_bounded_and_go_with_their_proxies(
    harness: Harness,
) -> None:
    def series() -> dict[str, float]:
        return {
            s.labels["version"]: s.value
            for m in metrics.REGISTRY.collect()
            if m.name == "pilot_xds"
            for s in m.samples
        }

    clients = []
    for i in range(300):
        version = f"1.{i}.0" if i % 2 else f"evil-{i}-" + "v" * 200
        c = harness.sotw(
            f"sidecar~10.1.{i // 250}.{i % 250}~p{i}.default~default.svc.cluster.local"
        )
        c.istio_version = version
        c.request(CDS)
        clients.append(c)
    for c in clients:
        await c.recv()
    live = series()
    assert len(live) <= metrics.MAX_VERSION_SERIES + 2
    assert sum(live.values()) == 300
    assert all(len(label) <= 32 for label in live)
    assert live.get("unknown") == 150
    for c in clients:
        await c.close()
    harness.clients.clear()
    await eventually(lambda: not harness.discovery.connections)
    assert series() == {}


GARBAGE = b"\xff\xff\xff\xff"


async def _raw_stream(harness: Harness, method: str, messages: list[bytes]) -> grpc.aio.AioRpcError:
    """Send raw bytes on an ADS method; returns the error that ends the stream."""
    call = harness.channel.stream_stream(
        f"/{SERVICE_NAME}/{method}",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )(iter(messages))
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError as e:
        return e
    raise AssertionError(f"stream ended with {await call.code()}, expected an error")


@pytest.mark.parametrize("method", ["StreamAggregatedResources", "DeltaAggregatedResources"])
async def test_an_undecodable_first_request_is_invalid_argument_with_one_log_line(
    harness: Harness, xds_logs: Logs, method: str
) -> None:
    err = await _raw_stream(harness, method, [GARBAGE])
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "do not decode" in (err.details() or "")
    [event] = xds_logs.named("xds request undecodable")
    assert event["level"] == "warning" and event["size"] == len(GARBAGE)
    assert all("\n" not in line and "Traceback" not in line for line in xds_logs.lines)


@pytest.mark.parametrize("method", ["StreamAggregatedResources", "DeltaAggregatedResources"])
async def test_garbage_after_a_valid_request_is_invalid_argument(
    harness: Harness, xds_logs: Logs, method: str
) -> None:
    if method == "StreamAggregatedResources":
        first = discovery_pb2.DiscoveryRequest(type_url=CDS, node=node())
    else:
        first = discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, node=node())
    err = await _raw_stream(harness, method, [first.SerializeToString(), GARBAGE])
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert len(xds_logs.named("xds request undecodable")) == 1
    await eventually(lambda: not harness.discovery.connections)


async def test_a_client_gone_mid_write_is_an_ordinary_disconnect(
    xds_logs: Logs, caplog: pytest.LogCaptureFixture
) -> None:
    gen = FakeGenerator()
    for i in range(100):
        gen.put(CDS, f"c{i}", "x" * 200_000)  # a 20 MB answer: the write must wait
    server, h = await start_harness(gen, FakeContext("v1"))
    upstream: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[None]] = []

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        # Passes the client's bytes on, but only the start of the server's, so the
        # server's big write blocks on flow control; then the upstream socket is reset.
        server_r, server_w = await asyncio.open_connection("127.0.0.1", h.port)
        upstream.append(server_w)

        async def pump(r: asyncio.StreamReader, w: asyncio.StreamWriter, limit: int) -> None:
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent < limit and (data := await r.read(min(65536, limit - sent))):
                    sent += len(data)
                    w.write(data)
                    await w.drain()

        tasks.append(asyncio.create_task(pump(server_r, client_w, 100_000)))
        await pump(client_r, server_w, 1 << 62)

    front = await asyncio.start_server(relay, "127.0.0.1", 0)
    port = front.sockets[0].getsockname()[1]
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    c = SotwClient(channel)
    try:
        with caplog.at_level(logging.WARNING):
            c.request(CDS)
            # The nonce is set just before the write starts, in the same step.
            await eventually(
                lambda: any(
                    (w := conn.watched.get(CDS)) is not None and w.nonce_sent
                    for conn in h.discovery.connections
                )
            )
            await asyncio.sleep(0.05)
            for w in upstream:
                w.transport.abort()
            await eventually(lambda: not h.discovery.connections)
            await asyncio.sleep(0.1)
        # gRPC either fails the pending write or cancels the handler first (a race in
        # its core); both must end as a quiet disconnect.
        assert xds_logs.named("xds disconnected")
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [e for e in xds_logs.events if e["level"] in ("warning", "error")]
    finally:
        await c.close()
        await channel.close(0)
        for t in tasks:
            t.cancel()
        front.close()
        await h.channel.close()
        await server.stop(0)


class _GoneContext:
    """A ServicerContext whose writes fail as gRPC's do once the peer's socket is gone."""

    def __init__(self) -> None:
        self.writes = 0

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    async def write(self, data: bytes) -> None:
        self.writes += 1
        raise RuntimeError('Failed "execute_batch": (SendMessageOperation)')

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise AssertionError(f"abort({code}, {details!r}) on a gone client")


async def test_a_failed_write_ends_the_stream_like_a_client_cancel(xds_logs: Logs) -> None:
    discovery = DiscoveryServer(default_generator(), FakeContext("v1"))

    async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        yield discovery_pb2.DiscoveryRequest(type_url=CDS, node=node())
        await asyncio.sleep(3600)

    context = _GoneContext()
    with pytest.raises(asyncio.CancelledError):
        await discovery.serve_stream(requests(), context, delta=False)  # type: ignore[arg-type]
    assert context.writes == 1
    assert not discovery.connections
    [gone] = xds_logs.named("xds client gone during a write")
    assert gone["level"] == "info" and "exc_info" not in gone
    assert not [e for e in xds_logs.events if e["level"] in ("warning", "error", "exception")]
