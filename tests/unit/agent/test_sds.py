"""SDS protocol over the real unix socket with an in-process gRPC client (SotW and
delta): subscribe `default` + `ROOTCA`, ACK, rotation pushes, NACK not resent,
stale nonces, backpressure, unknown names, reconnect with initial versions."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from meshpilot.agent import sds
from meshpilot.agent.filesecrets import FileSecrets, parse_name
from meshpilot.agent.sds import ROOT_SECRET, SECRET_TYPE_URL, WORKLOAD_SECRET, SecretCache

CHAIN = b"-----BEGIN CERTIFICATE-----\nchain-1\n-----END CERTIFICATE-----\n"
KEY = b"-----BEGIN PRIVATE KEY-----\nkey-1\n-----END PRIVATE KEY-----\n"
ROOT = b"-----BEGIN CERTIFICATE-----\nroot\n-----END CERTIFICATE-----\n"
NODE = base_pb2.Node(id="sidecar~127.0.0.1~client.default~default.svc.cluster.local")


class Client:
    """One SDS stream; responses are collected by a reader task."""

    def __init__(self, channel: grpc.aio.Channel, *, delta: bool = False) -> None:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        self.call: Any = stub.DeltaSecrets() if delta else stub.StreamSecrets()
        self.delta = delta
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())
        self.first = True

    async def _read(self) -> None:
        async for resp in self.call:
            self.responses.put_nowait(resp)

    async def send(self, **fields: Any) -> None:
        cls = discovery_pb2.DeltaDiscoveryRequest if self.delta else discovery_pb2.DiscoveryRequest
        req = cls(type_url=SECRET_TYPE_URL, **fields)
        if self.first:
            req.node.CopyFrom(NODE)
            self.first = False
        await self.call.write(req)

    async def recv(self, timeout: float = 3.0) -> Any:  # noqa: ASYNC109
        return await asyncio.wait_for(self.responses.get(), timeout)

    async def nothing(self, wait: float = 0.3) -> None:
        await asyncio.sleep(wait)
        assert self.responses.empty(), f"unexpected response: {self.responses.get_nowait()}"

    async def ack(self, resp: Any, names: list[str] | None = None) -> None:
        if self.delta:
            await self.send(response_nonce=resp.nonce)
        else:
            await self.send(
                version_info=resp.version_info, response_nonce=resp.nonce, resource_names=names
            )

    async def nack(self, resp: Any, names: list[str] | None = None) -> None:
        error = status_pb2.Status(code=3, message="Failed to load certificate chain from <inline>")
        if self.delta:
            await self.send(response_nonce=resp.nonce, error_detail=error)
        else:
            await self.send(response_nonce=resp.nonce, resource_names=names, error_detail=error)

    async def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()


def secrets_of(resp: Any) -> dict[str, secret_pb2.Secret]:
    out = {}
    for r in resp.resources:
        any_msg = r.resource if hasattr(r, "resource") and r.HasField("resource") else r
        s = secret_pb2.Secret()
        assert any_msg.Unpack(s)
        out[s.name] = s
    return out


class Harness:
    def __init__(self, path: Path, cache: SecretCache, server: grpc.aio.Server) -> None:
        self.path, self.cache, self.server = path, cache, server
        self.channel = grpc.aio.insecure_channel(f"unix:{path}")
        self.clients: list[Client] = []

    def client(self, *, delta: bool = False) -> Client:
        c = Client(self.channel, delta=delta)
        self.clients.append(c)
        return c

    def rotate(self, n: int) -> None:
        self.cache.set_workload(CHAIN.replace(b"chain-1", f"chain-{n}".encode()), KEY)


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    # Not tmp_path: pytest's directories are too deep for a 107-byte socket path.
    work = Path(tempfile.mkdtemp(prefix="mp-sds-"))
    cache = SecretCache(start_id="t")
    cache.set_root(ROOT)
    cache.set_workload(CHAIN, KEY)
    path = work / "sds.sock"
    files = FileSecrets(cache, poll_interval=0.05)
    server = await sds.start_server(path, cache, files=files)
    harness = Harness(path, cache, server)
    harness.work = work  # type: ignore[attr-defined]
    try:
        yield harness
    finally:
        for c in harness.clients:
            await c.close()
        await harness.channel.close()
        await sds.stop_server(server, path, grace=0)
        shutil.rmtree(work, ignore_errors=True)


async def test_socket_is_private(h: Harness) -> None:
    assert stat.S_ISSOCK(os.lstat(h.path).st_mode)
    assert stat.S_IMODE(os.lstat(h.path).st_mode) == 0o600


async def test_second_server_on_a_live_socket_is_refused(h: Harness) -> None:
    with pytest.raises(OSError, match="another agent"):
        await sds.start_server(h.path, h.cache)


async def test_stale_socket_file_is_replaced() -> None:
    work = Path(tempfile.mkdtemp(prefix="mp-sds-"))
    try:
        path = work / "sds.sock"
        import socket

        s = socket.socket(socket.AF_UNIX)
        s.bind(str(path))
        s.close()  # bound, never listening: what a dead agent leaves behind
        server = await sds.start_server(path, SecretCache())
        await sds.stop_server(server, path, grace=0)
        assert not path.exists()
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def test_sotw_subscribe_ack_rotate_nack(h: Harness) -> None:
    c = h.client()
    names = [WORKLOAD_SECRET, ROOT_SECRET]
    await c.send(resource_names=names)
    first = await c.recv()
    assert first.type_url == SECRET_TYPE_URL
    got = secrets_of(first)
    assert set(got) == {WORKLOAD_SECRET, ROOT_SECRET}
    assert got[WORKLOAD_SECRET].tls_certificate.certificate_chain.inline_bytes == CHAIN
    assert got[WORKLOAD_SECRET].tls_certificate.private_key.inline_bytes == KEY
    assert got[ROOT_SECRET].validation_context.trusted_ca.inline_bytes == ROOT
    await c.ack(first, names)
    await c.nothing()

    h.rotate(2)
    pushed = await c.recv()
    assert pushed.nonce != first.nonce and pushed.version_info != first.version_info
    chain = secrets_of(pushed)[WORKLOAD_SECRET].tls_certificate.certificate_chain.inline_bytes
    assert b"chain-2" in chain
    # The full subscribed set: with Envoy's shared mux a missing name reads as removed.
    assert set(secrets_of(pushed)) == {WORKLOAD_SECRET, ROOT_SECRET}

    await c.nack(pushed, names)
    await c.nothing()  # a rejected config is never resent as is
    stream = next(iter(_service(h.server).streams.values()))
    assert "certificate chain" in stream.nack

    h.rotate(3)  # new content: sent again
    third = await c.recv()
    assert (
        b"chain-3"
        in secrets_of(third)[WORKLOAD_SECRET].tls_certificate.certificate_chain.inline_bytes
    )
    await c.ack(third, names)
    await c.nothing()
    assert stream.nack == "" and stream.acked_version == third.version_info


async def test_sotw_one_stream_per_secret_as_envoy_opens_them(h: Harness) -> None:
    a, b = h.client(), h.client()
    await a.send(resource_names=[WORKLOAD_SECRET])
    await b.send(resource_names=[ROOT_SECRET])
    ra, rb = await a.recv(), await b.recv()
    assert list(secrets_of(ra)) == [WORKLOAD_SECRET]
    assert list(secrets_of(rb)) == [ROOT_SECRET]
    await a.ack(ra, [WORKLOAD_SECRET])
    await b.ack(rb, [ROOT_SECRET])
    h.rotate(2)
    assert list(secrets_of(await a.recv())) == [WORKLOAD_SECRET]
    await b.nothing()  # ROOTCA did not change


async def test_sotw_stale_nonce_is_ignored_and_backpressure_coalesces(h: Harness) -> None:
    c = h.client()
    await c.send(resource_names=[WORKLOAD_SECRET])
    first = await c.recv()
    await c.ack(first, [WORKLOAD_SECRET])
    h.rotate(2)
    second = await c.recv()
    # Not ACKed yet: further rotations wait, and then only the newest goes out.
    h.rotate(3)
    h.rotate(4)
    await c.nothing()
    await c.send(response_nonce=first.nonce, resource_names=[WORKLOAD_SECRET])  # stale
    await c.nothing()
    await c.ack(second, [WORKLOAD_SECRET])
    latest = await c.recv()
    assert (
        b"chain-4"
        in secrets_of(latest)[WORKLOAD_SECRET].tls_certificate.certificate_chain.inline_bytes
    )
    await c.ack(latest, [WORKLOAD_SECRET])
    await c.nothing()


async def test_sotw_unknown_names_never_block(h: Harness) -> None:
    c = h.client()
    await c.send(resource_names=["kubernetes://nope", WORKLOAD_SECRET])
    resp = await c.recv()
    assert list(secrets_of(resp)) == [WORKLOAD_SECRET]
    await c.ack(resp, ["kubernetes://nope", WORKLOAD_SECRET])
    await c.nothing()
    only_unknown = h.client()
    await only_unknown.send(resource_names=["kubernetes://nope"])
    empty = await only_unknown.recv()  # answered at once, not held back
    assert list(empty.resources) == []
    # A new subscription on the same stream is answered too.
    await c.send(
        version_info=resp.version_info,
        response_nonce=resp.nonce,
        resource_names=["kubernetes://nope", WORKLOAD_SECRET, ROOT_SECRET],
    )
    assert set(secrets_of(await c.recv())) == {WORKLOAD_SECRET, ROOT_SECRET}


async def test_secret_pushed_before_envoy_subscribes_is_served_on_subscribe(h: Harness) -> None:
    h.rotate(7)
    c = h.client()
    await c.send(resource_names=[WORKLOAD_SECRET])
    assert (
        b"chain-7"
        in secrets_of(await c.recv())[
            WORKLOAD_SECRET
        ].tls_certificate.certificate_chain.inline_bytes
    )


async def test_fetch_secrets(h: Harness) -> None:
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(h.channel)
    resp = await stub.FetchSecrets(
        discovery_pb2.DiscoveryRequest(resource_names=[ROOT_SECRET, "nope"]), timeout=3
    )
    assert list(secrets_of(resp)) == [ROOT_SECRET]


async def test_delta_subscribe_ack_rotate_nack_and_unknown(h: Harness) -> None:
    c = h.client(delta=True)
    await c.send(resource_names_subscribe=[WORKLOAD_SECRET, ROOT_SECRET, "nope"])
    first = await c.recv()
    assert {r.name for r in first.resources} == {WORKLOAD_SECRET, ROOT_SECRET}
    assert all(r.version for r in first.resources)
    assert list(first.removed_resources) == ["nope"]  # delta's "does not exist"
    await c.ack(first)
    await c.nothing()

    h.rotate(2)
    pushed = await c.recv()
    assert [r.name for r in pushed.resources] == [WORKLOAD_SECRET]  # only what changed
    assert list(pushed.removed_resources) == []
    await c.nack(pushed)
    await c.nothing()
    h.rotate(3)
    again = await c.recv()
    assert [r.name for r in again.resources] == [WORKLOAD_SECRET]
    await c.ack(again)
    # Unsubscribed names get no pushes, and no removals either.
    await c.send(resource_names_unsubscribe=[WORKLOAD_SECRET])
    stream = next(iter(_service(h.server).streams.values()))
    async with asyncio.timeout(3):
        while WORKLOAD_SECRET in stream.subscribed:  # noqa: ASYNC110 - request in flight
            await asyncio.sleep(0.01)
    h.rotate(4)
    await c.nothing()


async def test_delta_reconnect_with_initial_versions_sends_only_what_changed(h: Harness) -> None:
    c = h.client(delta=True)
    await c.send(resource_names_subscribe=[WORKLOAD_SECRET, ROOT_SECRET])
    first = await c.recv()
    versions = {r.name: r.version for r in first.resources}
    await c.close()
    h.rotate(2)
    d = h.client(delta=True)
    await d.send(
        resource_names_subscribe=[WORKLOAD_SECRET, ROOT_SECRET],
        initial_resource_versions=versions,
    )
    resp = await d.recv()
    assert [r.name for r in resp.resources] == [WORKLOAD_SECRET]


def test_unchanged_root_is_not_pushed() -> None:
    cache = SecretCache()
    seen: list[frozenset[str]] = []
    cache.subscribe(seen.append)
    assert cache.set_root(ROOT) is not None
    assert cache.set_root(ROOT) is None
    assert seen == [frozenset({ROOT_SECRET})]


def test_file_secret_names_parse_as_istio_writes_them() -> None:
    assert parse_name("file-cert:/a/cert.pem~/a/key.pem") == ("/a/cert.pem", "/a/key.pem")
    assert parse_name("file-root:/a/ca.pem") == ("/a/ca.pem",)
    for other in ("default", "ROOTCA", "kubernetes://x", "file-cert:/a", "file-root:"):
        assert parse_name(other) is None


async def test_file_cert_and_root_are_served_and_follow_file_changes(h: Harness) -> None:
    work: Path = h.work  # type: ignore[attr-defined]
    (work / "cert.pem").write_bytes(CHAIN)
    (work / "key.pem").write_bytes(KEY)
    (work / "ca.pem").write_bytes(ROOT)
    cert_name = f"file-cert:{work}/cert.pem~{work}/key.pem"
    root_name = f"file-root:{work}/ca.pem"
    missing = f"file-root:{work}/missing.pem"
    names = [cert_name, root_name, missing]
    c = h.client()
    await c.send(resource_names=names)
    first = await c.recv()
    got = secrets_of(first)
    assert set(got) == {cert_name, root_name}  # the missing file does not block the others
    assert got[cert_name].tls_certificate.certificate_chain.inline_bytes == CHAIN
    assert got[cert_name].tls_certificate.private_key.inline_bytes == KEY
    assert got[root_name].validation_context.trusted_ca.inline_bytes == ROOT
    await c.ack(first, names)
    await c.nothing()

    new_chain = CHAIN.replace(b"chain-1", b"chain-renewed")
    tmp = work / "cert.pem.new"
    tmp.write_bytes(new_chain)
    os.replace(tmp, work / "cert.pem")
    pushed = await c.recv()
    assert secrets_of(pushed)[cert_name].tls_certificate.certificate_chain.inline_bytes == new_chain
    await c.ack(pushed, names)
    (work / "missing.pem").write_bytes(ROOT)  # appears later: served then
    late = await c.recv()
    assert set(secrets_of(late)) == {cert_name, root_name, missing}


async def test_file_secret_that_is_not_pem_is_not_served(h: Harness) -> None:
    work: Path = h.work  # type: ignore[attr-defined]
    (work / "junk.pem").write_bytes(b"junk")
    c = h.client(delta=True)
    name = f"file-root:{work}/junk.pem"
    await c.send(resource_names_subscribe=[name])
    resp = await c.recv()
    assert list(resp.resources) == [] and list(resp.removed_resources) == [name]


def _service(server: Any) -> sds.SecretDiscoveryService:
    service = sds.service_of(server)
    assert service is not None
    return service
