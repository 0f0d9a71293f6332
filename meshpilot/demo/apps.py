"""Tiny asyncio backends for demos and end-to-end tests: an HTTP/1.1 echo and a TCP echo.

Pure stdlib so that a test can start dozens of them in milliseconds, in-process
(`await serve_http(...)`) or as a process (`python -m meshpilot.demo.apps http ...`).
Every server records what reached it, so a test can assert where a request went.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_DELAY_SECONDS = 60.0
UPSTREAM_TIMEOUT_SECONDS = 30.0
# Headers that bookinfo services forward so that one trace spans every hop.
PROPAGATED_HEADERS = (
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "traceparent",
    "tracestate",
    "x-ot-span-context",
    "x-cloud-trace-context",
    "end-user",
    "user-agent",
)
_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    408: "Request Timeout",
    413: "Payload Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class _BadRequest(ValueError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(slots=True)
class RecordedRequest:
    """One request as the backend received it (header names lowercased)."""

    method: str
    path: str
    version: str
    headers: dict[str, str]
    body: bytes
    peer: str
    served_by: str
    time: float = field(default_factory=time.monotonic)

    @property
    def host(self) -> str:
        return self.headers.get("host", "")


@dataclass(slots=True)
class HttpResponse:
    """A parsed HTTP/1.1 response (used for `/call/...`)."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class DemoServer:
    """A running demo backend: what arrived (`requests`), where (`address`), and `close()`."""

    def __init__(self, kind: str, service: str, version: str) -> None:
        self.kind = kind
        self.service = service
        self.version = version
        self.requests: list[RecordedRequest] = []
        # TCP echo: every received line, and how many connections were accepted.
        self.lines: list[str] = []
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.host = ""
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    @property
    def served_by(self) -> str:
        return _join_host_port(self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self.served_by}"

    def paths(self) -> list[str]:
        return [r.path for r in self.requests]

    async def close(self) -> None:
        """Stop listening and drop open (keep-alive) connections."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await server.wait_closed()

    async def __aenter__(self) -> DemoServer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self, handler: Any, host: str, port: int) -> None:
        async def tracked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)
            self._writers.add(writer)
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                self._writers.discard(writer)
                self._tasks.discard(task)
                writer.close()

        self._server = await asyncio.start_server(tracked, host, port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]


async def serve_http(
    host: str,
    port: int,
    *,
    service: str,
    version: str = "v1",
    upstream: str | None = None,
    fail_first_n: int = 0,
    extra_response_headers: Mapping[str, str] | None = None,
) -> DemoServer:
    """Start the HTTP/1.1 demo backend and return once it listens (`port=0`: any free port).

    Every request gets JSON describing it. Special paths (or headers):
    `/status/NNN` (`x-demo-status`), `/delay/SECONDS` (`x-demo-delay`), and, with
    `upstream` set, `/call/HOST[:PORT]/REST` which GETs `/REST` from `upstream` with
    `Host: HOST[:PORT]` and embeds the answer. The first `fail_first_n` requests get 503.
    """
    if upstream is not None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream {upstream!r}: expected http://HOST:PORT")
    server = DemoServer("http", service, version)
    state = {"failures_left": fail_first_n}
    extra = dict(extra_response_headers or {})

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        while True:
            try:
                request = await _read_request(reader, peer, server.served_by)
            except _BadRequest as e:
                body = json.dumps({"error": str(e)}).encode()
                await _write_response(writer, e.status, body, {}, keep_alive=False)
                return
            if request is None:
                return
            server.requests.append(request)
            status, payload, headers = await _answer(server, request, upstream, state)
            headers.update(extra)
            keep_alive = _wants_keep_alive(request)
            body = b"" if status in (204, 304) else json.dumps(payload).encode()
            await _write_response(
                writer, status, body, headers, keep_alive=keep_alive, head=request.method == "HEAD"
            )
            if not keep_alive:
                return

    await server._start(handle, host, port)
    return server


async def serve_tcp_echo(host: str, port: int, prefix: str = "hello") -> DemoServer:
    """Start Istio's tcp-echo: each received line is answered with `PREFIX LINE`."""
    server = DemoServer("tcp-echo", prefix, "")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.connections += 1
        while True:
            line = await reader.readline()
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            server.lines.append(text)
            writer.write(f"{prefix} {text}\n".encode())
            await writer.drain()

    await server._start(handle, host, port)
    return server


async def http_request(
    url: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
    body: bytes = b"",
    timeout: float = UPSTREAM_TIMEOUT_SECONDS,  # noqa: ASYNC109 - callers pass one deadline
) -> HttpResponse:
    """A minimal HTTP/1.1 client (one request per connection), enough for `/call/...`."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{url!r}: only http://HOST[:PORT]/PATH is supported")
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    send = {"host": parts.netloc, "connection": "close"}
    if body or method not in ("GET", "HEAD"):
        send["content-length"] = str(len(body))
    send.update({k.lower(): v for k, v in (headers or {}).items()})
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in send.items()), "", ""]
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(parts.hostname, port)
        try:
            writer.write("\r\n".join(lines).encode("latin-1") + body)
            await writer.drain()
            status_line = (await reader.readline()).decode("latin-1").strip()
            fields = status_line.split(" ", 2)
            if len(fields) < 2 or not fields[1].isdigit():
                raise ConnectionError(f"bad status line from {url}: {status_line!r}")
            resp_headers = await _read_headers(reader)
            resp_body = await _read_body(reader, resp_headers, until_eof=True)
            return HttpResponse(int(fields[1]), resp_headers, resp_body)
        finally:
            writer.close()


async def _answer(
    server: DemoServer,
    request: RecordedRequest,
    upstream: str | None,
    state: dict[str, int],
) -> tuple[int, dict[str, Any], dict[str, str]]:
    payload: dict[str, Any] = {
        "service": server.service,
        "version": server.version,
        "host": request.host,
        "method": request.method,
        "path": request.path,
        "headers": request.headers,
        "served_by": server.served_by,
    }
    headers = {"x-served-by": server.served_by, "x-demo-service": server.service}
    path = request.path.split("?", 1)[0]
    if state["failures_left"] > 0:
        state["failures_left"] -= 1
        payload["error"] = "fail_first_n"
        return 503, payload, headers
    delay = _number(path, "/delay/", request.headers.get("x-demo-delay"))
    if delay:
        await asyncio.sleep(min(max(delay, 0.0), MAX_DELAY_SECONDS))
    status = 200
    wanted = _number(path, "/status/", request.headers.get("x-demo-status"))
    if wanted is not None:
        status = int(wanted) if 100 <= wanted <= 599 else 400
    if path.startswith("/call/"):
        status = await _call_upstream(request, upstream, payload)
    return status, payload, headers


async def _call_upstream(
    request: RecordedRequest, upstream: str | None, payload: dict[str, Any]
) -> int:
    target, _, rest = request.path[len("/call/") :].partition("/")
    if upstream is None:
        payload["error"] = "no upstream configured (start with --upstream URL)"
        return 500
    if not target:
        payload["error"] = "expected /call/HOST[:PORT]/PATH"
        return 400
    forward = {k: v for k, v in request.headers.items() if k in PROPAGATED_HEADERS}
    forward["host"] = target
    try:
        resp = await http_request(f"{upstream.rstrip('/')}/{rest}", headers=forward)
    except (OSError, TimeoutError, ValueError, EOFError) as e:
        payload["upstream"] = {"target": target, "status": 0, "error": f"{type(e).__name__}: {e}"}
        return 502
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.body.decode("utf-8", "replace")
    payload["upstream"] = {"target": target, "status": resp.status, "body": body}
    # Mirror the upstream's status so that a client sees mesh failures (503 from Envoy).
    return resp.status


def _number(path: str, prefix: str, header: str | None) -> float | None:
    text = path[len(prefix) :].split("/", 1)[0] if path.startswith(prefix) else header
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


async def _read_request(
    reader: asyncio.StreamReader, peer: str, served_by: str
) -> RecordedRequest | None:
    line = await reader.readline()
    while line in (b"\r\n", b"\n"):  # tolerate stray CRLF between keep-alive requests
        line = await reader.readline()
    if not line:
        return None
    if len(line) > MAX_HEADER_BYTES or not line.endswith(b"\n"):
        raise _BadRequest(431, "request line too long")
    parts = line.decode("latin-1").strip().split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400, f"bad request line {line[:100]!r}")
    method, target, version = parts
    headers = await _read_headers(reader)
    body = await _read_body(reader, headers, until_eof=False)
    return RecordedRequest(method, target, version, headers, body, peer, served_by)


async def _read_headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    total = 0
    while True:
        line = await reader.readline()
        total += len(line)
        if total > MAX_HEADER_BYTES:
            raise _BadRequest(431, "headers too large")
        if not line:
            raise asyncio.IncompleteReadError(b"", None)
        if line in (b"\r\n", b"\n"):
            return headers
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name.strip():
            raise _BadRequest(400, f"bad header line {line[:100]!r}")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = f"{headers[key]},{value}" if key in headers else value


async def _read_body(
    reader: asyncio.StreamReader, headers: Mapping[str, str], *, until_eof: bool
) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        chunks: list[bytes] = []
        size_total = 0
        while True:
            size_line = await reader.readline()
            try:
                size = int(size_line.split(b";", 1)[0].strip(), 16)
            except ValueError as e:
                raise _BadRequest(400, "bad chunk size") from e
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers are not interesting here
                return b"".join(chunks)
            size_total += size
            if size_total > MAX_BODY_BYTES:
                raise _BadRequest(413, "body too large")
            chunks.append(await reader.readexactly(size))
            await reader.readline()
    length_text = headers.get("content-length")
    if length_text is not None:
        try:
            length = int(length_text)
        except ValueError as e:
            raise _BadRequest(400, f"bad content-length {length_text!r}") from e
        if length < 0 or length > MAX_BODY_BYTES:
            raise _BadRequest(413, "body too large")
        return await reader.readexactly(length)
    return await reader.read(MAX_BODY_BYTES) if until_eof else b""


async def _write_response(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    *,
    keep_alive: bool,
    head: bool = False,
) -> None:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "server: meshpilot-demo",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    if not keep_alive:
        lines.append("connection: close")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
    await writer.drain()


def _wants_keep_alive(request: RecordedRequest) -> bool:
    tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    if request.version == "HTTP/1.0":
        return "keep-alive" in tokens
    return "close" not in tokens


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return _join_host_port(peer[0], peer[1]) if peer else ""


def _join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def main(argv: Sequence[str] | None = None) -> int:
    """Process entry point: print `ready` once listening, exit 0 on SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(prog="python -m meshpilot.demo.apps")
    sub = parser.add_subparsers(dest="kind", required=True)
    http = sub.add_parser("http", help="HTTP/1.1 backend that answers with JSON about the request")
    http.add_argument("--listen", type=_split_listen, required=True, metavar="HOST:PORT")
    http.add_argument("--service", required=True)
    http.add_argument("--version", default="v1")
    http.add_argument("--upstream", default=None, metavar="URL")
    http.add_argument("--fail-first-n", type=int, default=0, metavar="N")
    tcp = sub.add_parser("tcp-echo", help="answer each line with PREFIX LINE")
    tcp.add_argument("--listen", type=_split_listen, required=True, metavar="HOST:PORT")
    tcp.add_argument("--prefix", default="hello")
    args = parser.parse_args(argv)
    return asyncio.run(_serve_until_signal(args))


async def _serve_until_signal(args: argparse.Namespace) -> int:
    host, port = args.listen
    try:
        if args.kind == "http":
            server = await serve_http(
                host,
                port,
                service=args.service,
                version=args.version,
                upstream=args.upstream,
                fail_first_n=args.fail_first_n,
            )
        else:
            server = await serve_tcp_echo(host, port, args.prefix)
    except (OSError, ValueError) as e:
        print(f"demo {args.kind}: cannot listen on {host}:{port}: {e}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
