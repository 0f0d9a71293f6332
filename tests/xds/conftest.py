"""An in-process ADS server on a free loopback port, a fake generator and clients."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field

import grpc
import pytest
import structlog
from structlog.testing import CapturingLogger

from meshpilot.model.push_request import PushRequest
from meshpilot.monitoring import metrics
from meshpilot.xds import connection as xds_connection
from meshpilot.xds import server as xds_server
from meshpilot.xds import typeurls
from meshpilot.xds.server import DiscoveryServer
from tests.xds.client import NODE_ID, DeltaClient, SotwClient
from tests.xds.fake_generator import FakeContext, FakeGenerator

CDS, EDS, LDS, RDS = typeurls.CLUSTER, typeurls.ENDPOINT, typeurls.LISTENER, typeurls.ROUTE


def sample(name: str, **labels: str) -> float:
    """Current value of a metric sample in the process registry (0 if never set)."""
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def eventually(predicate: Callable[[], object], within: float = 2.0) -> None:
    """Wait until `predicate()` is true; fail the test after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.005)


@dataclass
class Harness:
    discovery: DiscoveryServer
    gen: FakeGenerator
    channel: grpc.aio.Channel
    port: int
    clients: list[SotwClient | DeltaClient] = field(default_factory=list)
    version: int = 1

    def push(
        self, *, full: bool = True, eds_hosts: Iterable[str] = (), reason: str = "test"
    ) -> str:
        """Push a new context version to every connection; returns the version."""
        self.version += 1
        version = f"v{self.version}"
        request = PushRequest(
            full=full, eds_hosts=frozenset(eds_hosts), reasons=frozenset({reason})
        )
        self.discovery.push(request, FakeContext(version))
        return version

    def sotw(self, node_id: str = NODE_ID) -> SotwClient:
        c = SotwClient(self.channel, node_id)
        self.clients.append(c)
        return c

    def delta(self, node_id: str = NODE_ID) -> DeltaClient:
        c = DeltaClient(self.channel, node_id)
        self.clients.append(c)
        return c

    async def settled(self, within: float = 2.0) -> None:
        """Wait until the server has processed every ACK: nothing awaits one."""
        await eventually(
            lambda: (
                not any(
                    w.awaiting_ack for c in self.discovery.connections for w in c.watched.values()
                )
            ),
            within,
        )

    def status(self) -> dict[str, object]:
        """The only sync_status entry (tests with one connection)."""
        entries = self.discovery.sync_status()
        assert len(entries) == 1, entries
        return entries[0]


def default_generator() -> FakeGenerator:
    gen = FakeGenerator()
    for name in ("a", "b", "c"):
        gen.put(CDS, name)
        gen.put(EDS, name)
    for name in ("l1", "l2"):
        gen.put(LDS, name)
    for name in ("r1", "r2"):
        gen.put(RDS, name)
    return gen


async def start_harness(
    gen: FakeGenerator, context: FakeContext | None
) -> tuple[grpc.aio.Server, Harness]:
    discovery = DiscoveryServer(gen, context)
    server = xds_server.create_server(discovery)
    port = xds_server.bind(server, "127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return server, Harness(discovery, gen, channel, port)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    server, h = await start_harness(default_generator(), FakeContext("v1"))
    try:
        yield h
    finally:
        for c in h.clients:
            await c.close()
        await h.channel.close()
        await server.stop(0)


@dataclass
class Logs:
    """Log records of the xDS server: event dicts and the JSON lines they render to."""

    events: list[dict[str, object]] = field(default_factory=list)
    sink: CapturingLogger = field(default_factory=CapturingLogger)

    @property
    def lines(self) -> list[str]:
        return [str(call.args[0]) for call in self.sink.calls]

    def named(self, event: str) -> list[dict[str, object]]:
        return [e for e in self.events if e["event"] == event]


@pytest.fixture
def xds_logs(monkeypatch: pytest.MonkeyPatch) -> Logs:
    """The server's loggers replaced by one that renders JSON as `--log-format json` does
    (module loggers are cached after first use, so reconfiguring structlog is not enough)."""
    logs = Logs()

    def keep(
        _: object, method: str, event: structlog.typing.EventDict
    ) -> structlog.typing.EventDict:
        logs.events.append({**event, "level": method})
        return event

    logger = structlog.wrap_logger(
        logs.sink,
        processors=[
            keep,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )
    for module in (xds_server, xds_connection):
        if hasattr(module, "log"):
            monkeypatch.setattr(module, "log", logger)
    return logs
