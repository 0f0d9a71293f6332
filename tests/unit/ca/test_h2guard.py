"""The secure port's HTTP/2 request guard on hand-built frames, fed in any split."""

from __future__ import annotations

import hpack
import pytest

from meshpilot.ca.h2guard import (
    PREFACE,
    H2ProtocolError,
    RequestGuard,
    frame,
    marker_message,
)

LIMITED = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
OTHER = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
LIMIT = 64 * 1024
DATA, HEADERS, CONTINUATION = 0x0, 0x1, 0x9
END_STREAM, END_HEADERS, PADDED = 0x1, 0x4, 0x8


def headers(enc: hpack.Encoder, path: str) -> bytes:
    return enc.encode([(":method", "POST"), (":path", path), ("content-type", "application/grpc")])


def message(size: int, declared: int | None = None) -> bytes:
    return b"\x00" + (size if declared is None else declared).to_bytes(4, "big") + b"m" * size


def feed_in(guard: RequestGuard, data: bytes, step: int) -> bytes:
    return b"".join(guard.feed(data[i : i + step]) for i in range(0, len(data), step))


@pytest.mark.parametrize("step", [1, 5, 9, 100, 1 << 20])
def test_oversized_message_on_a_limited_stream_becomes_the_marker(step: int) -> None:
    enc = hpack.Encoder()
    block = headers(enc, LIMITED)
    other_block = headers(enc, OTHER)
    small = frame(DATA, 0, 3, message(100))
    # HEADERS split by a CONTINUATION, then a padded DATA frame declaring 100 KiB.
    oversized = b"\x04" + message(1000, declared=100 * 1024) + b"\x00" * 4
    stream = (
        PREFACE
        + frame(HEADERS, 0, 1, block[:3])
        + frame(CONTINUATION, END_HEADERS, 1, block[3:])
        + frame(HEADERS, END_HEADERS, 3, other_block)
        + frame(DATA, PADDED, 1, oversized)
        + frame(DATA, END_STREAM, 1, b"m" * 500)  # the rest: dropped
        + small
    )
    guard = RequestGuard({LIMITED: LIMIT})
    out = feed_in(guard, stream, step)
    expected = (
        PREFACE
        + frame(HEADERS, 0, 1, block[:3])
        + frame(CONTINUATION, END_HEADERS, 1, block[3:])
        + frame(HEADERS, END_HEADERS, 3, other_block)
        + frame(DATA, END_STREAM, 1, marker_message(100 * 1024))
        + small
    )
    assert out == expected
    assert guard.refused == 1


def test_messages_within_the_limit_pass_unchanged() -> None:
    enc = hpack.Encoder()
    data = frame(HEADERS, END_HEADERS, 1, headers(enc, LIMITED))
    body = message(LIMIT)
    data += b"".join(
        frame(DATA, END_STREAM if i + 16384 >= len(body) else 0, 1, body[i : i + 16384])
        for i in range(0, len(body), 16384)
    )
    guard = RequestGuard({LIMITED: LIMIT})
    assert feed_in(guard, PREFACE + data, 1000) == PREFACE + data
    assert guard.refused == 0


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", "preface"),
        (PREFACE + frame(DATA, 0, 1, b"x" * 20000), "frame of 20000 bytes"),
        (PREFACE + frame(HEADERS, END_HEADERS, 1, b"\xff\xff\xff\xff"), "header block"),
        (PREFACE + frame(CONTINUATION, END_HEADERS, 1, b""), "CONTINUATION"),
    ],
)
def test_broken_http2_closes_the_connection(data: bytes, error: str) -> None:
    with pytest.raises(H2ProtocolError, match=error):
        RequestGuard({LIMITED: LIMIT}).feed(data)


def test_a_prefix_split_across_frames_closes_the_connection() -> None:
    enc = hpack.Encoder()
    big = message(10, declared=1 << 20)
    data = (
        PREFACE
        + frame(HEADERS, END_HEADERS, 1, headers(enc, LIMITED))
        + frame(DATA, 0, 1, big[:3])
        + frame(DATA, 0, 1, big[3:])
    )
    guard = RequestGuard({LIMITED: LIMIT})
    with pytest.raises(H2ProtocolError, match="split prefix"):
        guard.feed(data)
