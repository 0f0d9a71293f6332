"""Reading a watch response: newline-delimited JSON events, with a cap on each line.

A watch is one long HTTP response. aiohttp's own line reader fails the whole stream on a
line over its buffer; here a line over the cap is skipped instead, and what its first
bytes say (event type, namespace, name) is handed back so that the informer can refuse
that one object by name and go on with the stream.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

_HEAD = 4096
_TYPE = re.compile(rb'"type"\s*:\s*"(\w+)"')
_METADATA = re.compile(rb'"metadata"\s*:\s*\{')
_NAME = re.compile(rb'"name"\s*:\s*"([^"\\]{1,253})"')
_NAMESPACE = re.compile(rb'"namespace"\s*:\s*"([^"\\]{1,63})"')


@dataclass(slots=True)
class Oversized:
    """A skipped line: its first bytes and its length."""

    head: bytes
    size: int

    def identify(self) -> tuple[str, str, str] | None:
        """(event type, namespace, name) as far as the first bytes tell, else None.

        API servers write `type` first and an object's metadata before its bulk
        (name and namespace lead it), so the head names the object."""
        kind = _TYPE.search(self.head)
        meta = _METADATA.search(self.head)
        if kind is None or meta is None:
            return None
        rest = self.head[meta.end() :]
        name = _NAME.search(rest)
        if name is None:
            return None
        ns = _NAMESPACE.search(rest)
        return (
            kind.group(1).decode(),
            ns.group(1).decode() if ns else "",
            name.group(1).decode(),
        )


async def lines(content: aiohttp.StreamReader, cap: int) -> AsyncIterator[bytes | Oversized]:
    """The non-empty lines of a stream; a line longer than `cap` comes as Oversized."""
    buf = bytearray()
    skipped: Oversized | None = None
    async for chunk in content.iter_any():
        buf += chunk
        while (end := buf.find(b"\n")) >= 0:
            if skipped is not None:
                skipped.size += end
                del buf[: end + 1]
                yield skipped
                skipped = None
                continue
            line = bytes(buf[:end])
            del buf[: end + 1]
            if line.strip():
                yield line
        if skipped is not None:
            skipped.size += len(buf)
            buf.clear()
        elif len(buf) > cap:
            skipped = Oversized(bytes(buf[:_HEAD]), len(buf))
            buf.clear()
