"""The secure port's TLS front: optional verified client certificates, a faithful relay."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshpilot.ca.authority import CertificateAuthority
from meshpilot.ca.h2guard import ResponseFilter, frame, oversized_marker
from meshpilot.ca.secure import SecurePort
from meshpilot.ca.tlsfront import (
    REFUSED_CONNECTIONS,
    FrontLimits,
    PeerTable,
    TlsFront,
    TlsPeer,
    grpc_peer_string,
    normalise_peer,
    server_context,
)

from ._helpers import SLEEP, csr_pem, ec_key, load_chain

SERVER_NAME = "istiod.istio-system.svc"
_peers_seen: list[TlsPeer | None] = []


async def _echo(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    _peers_seen.append(_TABLE.for_context(context))
    async for chunk in requests:
        yield chunk


_TABLE = PeerTable()


@pytest.fixture
def ca_only(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.fixture
def limits() -> FrontLimits:
    return FrontLimits()


@pytest.fixture
async def front(
    tmp_path: Path, limits: FrontLimits
) -> AsyncIterator[tuple[CertificateAuthority, TlsFront, int]]:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    ident = lambda b: b  # noqa: E731
    handler = grpc.stream_stream_rpc_method_handler(
        _echo, request_deserializer=ident, response_serializer=ident
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Echo", {"Echo": handler}),)
    )
    upstream = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    chain, key = ca.issue_server_cert([SERVER_NAME], ["127.0.0.1"])
    tls = TlsFront(
        _TABLE,
        ("127.0.0.1", upstream),
        server_context("".join(chain), key, ca.root_cert_pem),
        limits,
    )
    port = await tls.start("127.0.0.1", 0)
    try:
        yield ca, tls, port
    finally:
        await tls.stop()
        await server.stop(0)


def _channel(
    ca: CertificateAuthority, port: int, cert: tuple[bytes, bytes] | None
) -> grpc.aio.Channel:
    key, chain = cert if cert else (None, None)
    creds = grpc.ssl_channel_credentials(
        ca.root_cert_pem.encode(), private_key=key, certificate_chain=chain
    )
    opts = [
        ("grpc.ssl_target_name_override", SERVER_NAME),
        ("grpc.max_receive_message_length", 64 << 20),
    ]
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=opts)


def _workload_cert(ca: CertificateAuthority) -> tuple[bytes, bytes]:
    key = ec_key()
    chain = ca.sign(csr_pem(key), SLEEP)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, "".join(chain).encode()


async def test_relay_is_faithful_for_large_streams_and_maps_the_peer(
    front: tuple[CertificateAuthority, TlsFront, int],
) -> None:
    ca, tls, port = front
    cert = _workload_cert(ca)
    chunks = [bytes([i % 251]) * (1 << 20) + hashlib.sha256(bytes([i])).digest() for i in range(24)]
    _peers_seen.clear()
    async with _channel(ca, port, cert) as ch:
        call = ch.stream_stream(
            "/t.Echo/Echo", request_serializer=None, response_deserializer=None
        )()

        async def send() -> None:
            for c in chunks:
                await call.write(c)
            await call.done_writing()

        sender = asyncio.create_task(send())
        got = [bytes(m) async for m in call]
        await sender
    assert got == chunks
    peer = _peers_seen[0]
    assert peer is not None and peer.cert is not None
    uris = peer.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [str(SLEEP)]
    # Gone from the table once the connection is closed (grpc clients keep idle
    # connections around after channel.close(), so close from the server side).
    await tls.stop()
    for _ in range(50):
        if not len(_TABLE):
            break
        await asyncio.sleep(0.02)
    assert len(_TABLE) == 0


async def test_no_client_certificate_is_allowed(
    front: tuple[CertificateAuthority, TlsFront, int],
) -> None:
    ca, _, port = front
    _peers_seen.clear()
    async with _channel(ca, port, None) as ch:
        call = ch.stream_stream(
            "/t.Echo/Echo", request_serializer=None, response_deserializer=None
        )()
        await call.write(b"hello")
        assert await call.read() == b"hello"
        call.cancel()
    assert _peers_seen[0] is not None and _peers_seen[0].cert is None


async def test_foreign_client_certificate_fails_the_handshake(
    front: tuple[CertificateAuthority, TlsFront, int], tmp_path: Path
) -> None:
    ca, _, port = front
    other = CertificateAuthority.load_or_create(tmp_path / "other")
    async with _channel(ca, port, _workload_cert(other)) as ch:
        call = ch.stream_stream(
            "/t.Echo/Echo", request_serializer=None, response_deserializer=None
        )()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call.write(b"hello")
            await call.read()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_server_certificate_is_renewed_at_half_life(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    port = SecurePort(ca, "127.0.0.1:0", server_cert_ttl=3)
    try:
        await port.start()

        async def served_serial() -> int:
            ctx = ssl.create_default_context(cadata=ca.root_cert_pem)
            ctx.set_alpn_protocols(["h2"])
            _, w = await asyncio.open_connection(
                "127.0.0.1", port.port, ssl=ctx, server_hostname=SERVER_NAME
            )
            der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
            w.close()
            return x509.load_der_x509_certificate(der).serial_number

        first = await served_serial()
        for _ in range(60):
            await asyncio.sleep(0.1)
            if await served_serial() != first:
                break
        else:
            pytest.fail("the serving certificate was not renewed")
        assert load_chain([ca.root_cert_pem])  # the root itself never changes
    finally:
        await port.stop()


# --- connections before their handshake -------------------------------------------------


async def _bare(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection from `source` that never sends a byte."""
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _closed_by_server(reader: asyncio.StreamReader, within: float = 2.0) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), within) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def _echo_once(ca: CertificateAuthority, port: int, pause: float = 0.0) -> bytes:
    async with _channel(ca, port, None) as ch:
        call = ch.stream_stream(
            "/t.Echo/Echo", request_serializer=None, response_deserializer=None
        )()
        await call.write(b"ping")
        got = await asyncio.wait_for(call.read(), 10)
        if pause:
            await asyncio.sleep(pause)
            await call.write(b"pong")
            got += await asyncio.wait_for(call.read(), 10)
        call.cancel()
    return bytes(got)


def _refused(reason: str) -> float:
    return REFUSED_CONNECTIONS.labels(reason)._value.get()


@pytest.mark.parametrize(
    "limits", [FrontLimits(handshakes_per_ip=3, handshakes_total=5, handshake_timeout=60)]
)
async def test_connections_before_the_handshake_are_capped_per_source_and_in_total(
    front: tuple[CertificateAuthority, TlsFront, int],
) -> None:
    ca, tls, port = front
    per_ip, total = _refused("per_ip_limit"), _refused("total_limit")
    one = [await _bare(port, "127.0.0.1") for _ in range(5)]
    closed = [await _closed_by_server(r, 0.3) for r, _ in one]
    # The first three hold a slot; the other two are reset at once.
    assert closed == [False, False, False, True, True]
    assert tls.handshaking == 3 and _refused("per_ip_limit") == per_ip + 2
    # Bare connections cost a socket: no TLS state before the first byte.
    assert all(r.sslobj is None for r in tls._relays)

    # Meanwhile a real TLS client from another address completes its handshake.
    ctx = ssl.create_default_context(cadata=ca.root_cert_pem)
    ctx.set_alpn_protocols(["h2"])
    _, w = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=SERVER_NAME, local_addr=("127.0.0.4", 0)
    )
    assert w.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    w.close()
    for _ in range(100):
        if tls.handshaking == 3:
            break
        await asyncio.sleep(0.02)
    assert tls.handshaking == 3  # its slot was released at the end of the handshake

    two = [await _bare(port, "127.0.0.2") for _ in range(3)]
    assert [await _closed_by_server(r, 0.3) for r, _ in two] == [False, False, True]
    assert tls.handshaking == 5 and _refused("total_limit") == total + 1

    # A real TLS client while every slot is taken: refused too.
    with pytest.raises((grpc.aio.AioRpcError, TimeoutError)):
        await asyncio.wait_for(_echo_once(ca, port), 3)

    # Closing connections gives their slots back, and a real client gets through.
    for _, w in one[:3]:
        w.close()
    for _ in range(100):
        if tls.handshaking == 2:
            break
        await asyncio.sleep(0.02)
    assert tls.handshaking == 2
    assert await _echo_once(ca, port) == b"ping"
    for _, w in [*one, *two]:
        w.close()


@pytest.mark.parametrize(
    "limits", [FrontLimits(handshakes_per_ip=2, handshakes_total=10, handshake_timeout=0.3)]
)
async def test_an_unfinished_handshake_is_closed_and_its_slot_released(
    front: tuple[CertificateAuthority, TlsFront, int],
) -> None:
    ca, tls, port = front
    before = _refused("handshake_timeout")
    silent_reader, silent = await _bare(port, "127.0.0.1")
    # Half a TLS record header, then nothing.
    partial_reader, partial = await _bare(port, "127.0.0.1")
    partial.write(b"\x16\x03\x01")
    assert await _closed_by_server(silent_reader, 5)
    assert await _closed_by_server(partial_reader, 5)
    assert tls.handshaking == 0
    assert _refused("handshake_timeout") == before + 2
    # Handshakes that finish are not cut by the timer, nor are their calls.
    assert await _echo_once(ca, port, pause=0.6) == b"pingpong"
    silent.close()
    partial.close()


# --- what the PeerTable relies on -------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_grpc_reports_the_relay_socket_as_the_front_names_it(
    ca_only: CertificateAuthority, host: str
) -> None:
    # The PeerTable is keyed by grpc_peer_string(relay socket) and looked up with
    # context.peer(): a real grpc.aio server, reached over IPv4 and IPv6 loopback
    # through the front, must report exactly that string.
    reported: list[str] = []
    found: list[TlsPeer | None] = []

    async def echo(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        reported.append(context.peer())
        found.append(table.for_context(context))
        async for chunk in requests:
            yield chunk

    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.stream_stream_rpc_method_handler(
        echo, request_deserializer=None, response_serializer=None
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Echo", {"Echo": handler}),)
    )
    bound = server.add_insecure_port(f"[{host}]:0" if ":" in host else f"{host}:0")
    await server.start()
    chain, key = ca_only.issue_server_cert([SERVER_NAME], ["127.0.0.1"])
    table = PeerTable()
    tls = TlsFront(table, (host, bound), server_context("".join(chain), key, ca_only.root_cert_pem))
    port = await tls.start("127.0.0.1", 0)
    try:
        async with _channel(ca_only, port, None) as ch:
            call = ch.stream_stream(
                "/t.Echo/Echo", request_serializer=None, response_deserializer=None
            )()
            await call.write(b"hi")
            assert await asyncio.wait_for(call.read(), 10) == b"hi"
            (relay,) = tls._relays
            assert relay.upstream is not None and relay.upstream.transport is not None
            sockname = relay.upstream.transport.get_extra_info("sockname")
            family = "ipv6" if ":" in host else "ipv4"
            # grpc percent-encodes IPv6 brackets: `ipv6:%5B::1%5D:PORT`.
            assert [normalise_peer(p) for p in reported] == [grpc_peer_string(sockname)]
            assert reported[0].startswith(f"{family}:")
            assert found[0] is not None and found[0].cert is None
            call.cancel()
    finally:
        await tls.stop()
        await server.stop(0)


# --- per-method request limits ----------------------------------------------------------


@pytest.fixture
async def guarded(
    ca_only: CertificateAuthority,
) -> AsyncIterator[tuple[TlsFront, int]]:
    ident = lambda b: b  # noqa: E731
    handler = grpc.stream_stream_rpc_method_handler(
        _echo, request_deserializer=ident, response_serializer=ident
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("t.Echo", {"Echo": handler, "Limited": handler}),)
    )
    upstream = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    chain, key = ca_only.issue_server_cert([SERVER_NAME], ["127.0.0.1"])
    tls = TlsFront(
        _TABLE,
        ("127.0.0.1", upstream),
        server_context("".join(chain), key, ca_only.root_cert_pem),
        request_limits={"/t.Echo/Limited": 64 * 1024},
    )
    port = await tls.start("127.0.0.1", 0)
    try:
        yield tls, port
    finally:
        await tls.stop()
        await server.stop(0)


async def _exchange(
    ca: CertificateAuthority, port: int, path: str, msgs: list[bytes]
) -> list[bytes]:
    async with _channel(ca, port, None) as ch:
        call = ch.stream_stream(path, request_serializer=None, response_deserializer=None)()

        async def send() -> None:
            for m in msgs:
                await call.write(m)
            await call.done_writing()

        sender = asyncio.create_task(send())
        got = [bytes(m) async for m in call]
        await sender
    return got


async def test_limited_methods_get_a_marker_instead_of_an_oversized_message(
    ca_only: CertificateAuthority, guarded: tuple[TlsFront, int]
) -> None:
    tls, port = guarded
    small = b"s" * 1000
    assert await _exchange(ca_only, port, "/t.Echo/Limited", [small]) == [small]
    before = tls.relayed_bytes
    big = b"b" * (1 << 20)
    # The server sees the front's marker, naming the declared size, never the megabyte.
    got = await _exchange(ca_only, port, "/t.Echo/Limited", [big])
    assert [oversized_marker(m) for m in got] == [1 << 20]
    assert tls.relayed_bytes - before < 16 * 1024


async def test_unlimited_methods_relay_large_streams_faithfully_through_the_guard(
    ca_only: CertificateAuthority, guarded: tuple[TlsFront, int]
) -> None:
    _, port = guarded
    chunks = [bytes([i % 251]) * (1 << 20) + hashlib.sha256(bytes([i])).digest() for i in range(8)]
    assert await _exchange(ca_only, port, "/t.Echo/Echo", chunks) == chunks


def test_response_filter_caps_the_advertised_frame_size_across_any_split() -> None:
    settings = frame(0x4, 0, 0, bytes.fromhex("000400400000000500400000000600004000"))
    data = frame(0x0, 0, 1, b"x" * 70) + settings + frame(0x4, 0x1, 0, b"")
    for step in (1, 2, 7, 9, 50, len(data)):
        f = ResponseFilter()
        out = b"".join(f.feed(data[i : i + step]) for i in range(0, len(data), step))
        assert len(out) == len(data)
        capped = settings.replace(bytes.fromhex("000500400000"), bytes.fromhex("000500004000"))
        assert out == data.replace(settings, capped)
