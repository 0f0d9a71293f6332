"""Receive limits on the secure port, applied to the HTTP/2 the TLS front relays.

The secure port's internal gRPC server serves both CreateCertificate (a request of
~1 KiB; 64 KiB allowed) and ADS (requests of up to megabytes for large meshes), and
gRPC has one receive limit per server. So the TLS front reads the client's HTTP/2
frames as it relays them: it decodes request headers (HPACK, to find each stream's
`:path`) and, on streams of a limited method, the 5-byte gRPC message prefixes. A
message declared above its method's limit is never relayed: the front ends the
stream upstream with a small marker message instead, which the CA answers with
RESOURCE_EXHAUSTED, and drops what the client still sends on that stream. The
oversized bytes are never buffered, by the front or by gRPC.

Client frames are relayed whole (at most MAX_FRAME bytes buffered per connection;
the server's SETTINGS are rewritten so that clients send no larger ones). A client
that breaks HTTP/2 here, or whose oversized message begins in a frame that
was already relayed, loses its connection instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Client frames are buffered whole, so clients are told to send no larger ones:
# ResponseFilter lowers the SETTINGS_MAX_FRAME_SIZE that gRPC advertises (4 MiB, and
# the server option for it is not honoured) to HTTP/2's default. A larger frame is a
# protocol error.
MAX_FRAME = 16 * 1024
# Header blocks (HEADERS + CONTINUATION) buffered until complete; gRPC's own
# default metadata limit is 8 KiB.
MAX_HEADER_BLOCK = 64 * 1024
# Relayed in place of a refused message. 0xff is no valid protobuf tag, so no real
# request starts like this; a client sending it only refuses its own call.
OVERSIZED_MARKER = b"\xff\xffmeshpilot-front-oversized:"

_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _CONTINUATION = 0x0, 0x1, 0x3, 0x4, 0x9
_SETTINGS_MAX_FRAME_SIZE = 0x5
_MAX_SETTINGS_FRAME = 1024
_END_STREAM, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x4, 0x8, 0x20
_HPACK_TABLE = 64 * 1024


class H2ProtocolError(Exception):
    """The client's HTTP/2 cannot be relayed; the connection must be closed."""


def frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes((ftype, flags))
        + stream.to_bytes(4, "big")
        + payload
    )


def marker_message(declared: int) -> bytes:
    """The gRPC message relayed instead of one of `declared` bytes."""
    body = OVERSIZED_MARKER + declared.to_bytes(8, "big")
    return b"\x00" + len(body).to_bytes(4, "big") + body


def oversized_marker(message: bytes) -> int | None:
    """The declared size if `message` is the front's marker, else None."""
    if message.startswith(OVERSIZED_MARKER) and len(message) == len(OVERSIZED_MARKER) + 8:
        return int.from_bytes(message[len(OVERSIZED_MARKER) :], "big")
    return None


class _Messages:
    """gRPC length-prefixed messages of one stream, followed across DATA frames."""

    __slots__ = ("header", "left", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.header = bytearray()
        self.left = 0

    def feed(self, payload: bytes) -> tuple[int, int] | None:
        """(offset of the prefix in `payload`, declared size) of the first message
        above the limit; the offset is negative if the prefix began in an earlier frame."""
        i, n = 0, len(payload)
        while i < n:
            if self.left:
                take = min(self.left, n - i)
                self.left -= take
                i += take
                continue
            start = i - len(self.header)
            need = 5 - len(self.header)
            self.header += payload[i : i + need]
            i += min(need, n - i)
            if len(self.header) == 5:
                size = int.from_bytes(self.header[1:5], "big")
                self.header.clear()
                if size > self.limit:
                    return start, size
                self.left = size
        return None


class RequestGuard:
    """The client-to-server half of one relayed HTTP/2 connection."""

    def __init__(self, limits: Mapping[str, int]) -> None:
        self.limits = dict(limits)
        self.refused = 0  # messages refused on this connection
        self._buf = bytearray()
        self._preface = len(PREFACE)
        self._decoder = hpack.Decoder()
        self._decoder.max_allowed_table_size = _HPACK_TABLE
        self._decoder.max_header_list_size = MAX_HEADER_BLOCK
        self._block = bytearray()
        self._block_stream = 0
        self._block_end_stream = False
        self._messages: dict[int, _Messages] = {}
        self._ended: set[int] = set()

    def feed(self, data: bytes) -> bytes:
        """What to relay upstream for `data` from the client (whole frames only)."""
        self._buf += data
        out = bytearray()
        if self._preface:
            take = bytes(self._buf[: self._preface])
            if take != PREFACE[len(PREFACE) - self._preface :][: len(take)]:
                raise H2ProtocolError("not an HTTP/2 client preface")
            out += take
            del self._buf[: len(take)]
            self._preface -= len(take)
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if length > MAX_FRAME:
                raise H2ProtocolError(f"frame of {length} bytes above {MAX_FRAME}")
            if len(self._buf) < 9 + length:
                break
            ftype, flags = self._buf[3], self._buf[4]
            stream = int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF
            raw = bytes(self._buf[: 9 + length])
            del self._buf[: 9 + length]
            out += self._frame(ftype, flags, stream, raw)
        return bytes(out)

    def _frame(self, ftype: int, flags: int, stream: int, raw: bytes) -> bytes:
        if self._block_stream and ftype != _CONTINUATION:
            raise H2ProtocolError("header block interrupted")
        if ftype == _HEADERS:
            fragment = _unpad(raw[9:], flags)
            if flags & _PRIORITY:
                fragment = fragment[5:]
            self._header_fragment(stream, fragment, flags, flags & _END_STREAM)
        elif ftype == _CONTINUATION:
            if stream != self._block_stream:
                raise H2ProtocolError("CONTINUATION without its HEADERS")
            self._header_fragment(stream, raw[9:], flags, self._block_end_stream)
        elif ftype == _DATA:
            return self._data(flags, stream, raw)
        elif ftype == _RST_STREAM:
            self._messages.pop(stream, None)
            self._ended.discard(stream)
        # Frames of a stream ended by the front are not relayed (the upstream saw its
        # END_STREAM); HEADERS were decoded all the same to keep HPACK in step.
        return b"" if stream in self._ended else raw

    def _header_fragment(self, stream: int, fragment: bytes, flags: int, end: int) -> None:
        if len(self._block) + len(fragment) > MAX_HEADER_BLOCK:
            raise H2ProtocolError(f"header block above {MAX_HEADER_BLOCK} bytes")
        self._block += fragment
        if not flags & _END_HEADERS:
            self._block_stream, self._block_end_stream = stream, bool(end)
            return
        self._block_stream = 0
        block = bytes(self._block)
        self._block.clear()
        try:
            # hpack decodes to str (raw=False); its annotations say bytes.
            headers = cast(list[tuple[str, str]], self._decoder.decode(block))
        except hpack.HPACKError as e:
            raise H2ProtocolError(f"header block: {e}") from None
        path = next((str(v) for k, v in headers if k == ":path"), None)
        if path is not None and path in self.limits and stream not in self._messages:
            self._messages[stream] = _Messages(self.limits[path])

    def _data(self, flags: int, stream: int, raw: bytes) -> bytes:
        messages = self._messages.get(stream)
        if stream in self._ended or messages is None:
            return b"" if stream in self._ended else raw
        payload = _unpad(raw[9:], flags)
        found = messages.feed(payload)
        if flags & _END_STREAM:
            del self._messages[stream]
        if found is None:
            return raw
        offset, size = found
        if offset < 0:
            raise H2ProtocolError(f"message of {size} bytes above the limit, split prefix")
        self.refused += 1
        self._messages.pop(stream, None)
        self._ended.add(stream)
        before = frame(_DATA, 0, stream, payload[:offset]) if offset else b""
        return before + frame(_DATA, _END_STREAM, stream, marker_message(size))


class ResponseFilter:
    """The server-to-client half: passes everything, with SETTINGS_MAX_FRAME_SIZE
    capped at MAX_FRAME. Only frame headers are read; payloads stream through."""

    def __init__(self) -> None:
        self._skip = 0
        self._head = bytearray()
        self._settings: bytearray | None = None
        self._settings_left = 0

    def feed(self, data: bytes) -> bytes:
        if self._skip >= len(data):
            self._skip -= len(data)
            return data
        if not self._head and self._settings is None:
            # Common case, without a copy: only whole frame headers, none of SETTINGS.
            skip = self._clean_skip(data)
            if skip is not None:
                self._skip = skip
                return data
        out = bytearray()
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                out += data[i : i + take]
                self._skip -= take
                i += take
            elif self._settings is not None:
                take = min(self._settings_left, n - i)
                self._settings += data[i : i + take]
                self._settings_left -= take
                i += take
                if not self._settings_left:
                    out += _cap_frame_size(bytes(self._settings))
                    self._settings = None
            else:
                need = 9 - len(self._head)
                self._head += data[i : i + need]
                i += min(need, n - i)
                if len(self._head) < 9:
                    break
                length = int.from_bytes(self._head[:3], "big")
                is_settings = self._head[3] == _SETTINGS and not self._head[4] & 0x1
                if is_settings and 0 < length <= _MAX_SETTINGS_FRAME:
                    self._settings, self._settings_left = bytearray(self._head), length
                else:
                    out += self._head
                    self._skip = length
                self._head.clear()
        return bytes(out)

    def _clean_skip(self, data: bytes) -> int | None:
        """The payload bytes left after `data` if it holds no SETTINGS frame and ends
        inside a payload or on a frame boundary; None otherwise."""
        i, n = self._skip, len(data)
        while i < n:
            if n - i < 9 or (data[i + 3] == _SETTINGS and not data[i + 4] & 0x1):
                return None
            i += 9 + int.from_bytes(data[i : i + 3], "big")
        return i - n


def _cap_frame_size(settings: bytes) -> bytes:
    payload = bytearray(settings[9:])
    for j in range(0, len(payload) - 5, 6):
        key = int.from_bytes(payload[j : j + 2], "big")
        if (
            key == _SETTINGS_MAX_FRAME_SIZE
            and int.from_bytes(payload[j + 2 : j + 6], "big") > MAX_FRAME
        ):
            payload[j + 2 : j + 6] = MAX_FRAME.to_bytes(4, "big")
    return settings[:9] + bytes(payload)


def _unpad(payload: bytes, flags: int) -> bytes:
    if not flags & _PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise H2ProtocolError("bad padding")
    return payload[1 : len(payload) - payload[0]]
