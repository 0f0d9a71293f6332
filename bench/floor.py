"""The raw floor: a tiny grpc.aio ADS server that streams pre-serialized bytes.

    python -m bench.floor [--port 0]

It has no protocol logic at all. Each stream reads requests (deserialized with the
same protobuf classes the real server uses) and, after the first one, writes the
"initial" script; a `push` command writes another script to every stream. Scripts
are DiscoveryResponses captured from the real run (`bench.client` capture files), so
the floor moves the same bytes, as the same number of messages, to the same number of
streams as the control plane did: what a push costs at the very least in Python.

Commands: load {phase, path} -> loaded; push {phase} -> pushing; stats -> stats; quit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from bench import wire
from bench.procs import Control, cpu_seconds, rss_kb, thread_cpu
from bench.wire import read_script

MAX_MESSAGE = 256 * 1024 * 1024
# The control plane's own server options, so transport settings do not differ.
SERVER_OPTIONS = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 15_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_concurrent_streams", 100_000),
)


class Floor:
    def __init__(self) -> None:
        self.scripts: dict[str, list[bytes]] = {"initial": []}
        self.queues: set[asyncio.Queue[str | None]] = set()
        self.requests = 0
        self.writes = 0

    async def _drain(self, it: AsyncIterator[Any]) -> None:
        with contextlib.suppress(Exception):
            async for _ in it:
                self.requests += 1

    async def stream(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        it = aiter(requests)
        try:
            await anext(it)
        except StopAsyncIteration:
            return
        self.requests += 1
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.queues.add(queue)
        reader = asyncio.create_task(self._drain(it))
        write = context.write
        try:
            for data in self.scripts["initial"]:
                await write(data)
            while (phase := await queue.get()) is not None:
                for data in self.scripts[phase]:
                    await write(data)
        finally:
            self.queues.discard(queue)
            reader.cancel()

    def server(self) -> grpc.aio.Server:
        server = grpc.aio.server(options=SERVER_OPTIONS)
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.stream,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=None,
            ),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.stream,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=None,
            ),
        }
        service = wire.ADS_SOTW.split("/")[1]
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        return server

    def push(self, phase: str) -> int:
        for q in self.queues:
            q.put_nowait(phase)
        return len(self.queues)


async def main_async(args: argparse.Namespace) -> None:
    ctl = Control()
    floor = Floor()
    server = floor.server()
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()

    def handle(cmd: dict[str, Any]) -> str | None:
        name = cmd["cmd"]
        if name == "load":
            script = floor.scripts[cmd["phase"]] = read_script(cmd["path"])
            ctl.emit("loaded", phase=cmd["phase"], messages=len(script))
        elif name == "push":
            t = time.monotonic()
            n = floor.push(cmd["phase"])
            ctl.emit("pushing", phase=cmd["phase"], streams=n, t=t)
        elif name == "stats":
            pid = os.getpid()
            ctl.emit(
                "stats",
                rss_kb=rss_kb(pid),
                cpu=cpu_seconds(pid),
                threads=thread_cpu(pid),
                connections=len(floor.queues),
                requests=floor.requests,
            )
        elif name == "quit":
            return "quit"
        else:
            raise ValueError(f"unknown command {name!r}")
        return None

    ctl.emit("ready", pid=os.getpid(), port=port)
    try:
        await ctl.serve(handle)
    finally:
        for q in list(floor.queues):
            q.put_nowait(None)
        await server.stop(grace=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, default=0)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
