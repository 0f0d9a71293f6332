"""A plain-HTTP control endpoint on loopback for an emulator running in another process.

The same fault injection the in-process `ApiServer` methods offer, as requests:

    POST /cut-watches[?abort=true]        POST /compact[?rv=N]
    POST /fail-next?count=N[&code=500]    POST /fail-fraction?fraction=F[&code=500&seed=0]
    POST /delay?seconds=S                 POST /clear-faults
    POST /stop   POST /start              POST /bookmarks
    GET  /requests  -> {"verb resource": count, ...}

It binds 127.0.0.1 only and is separate from the API port, so the API surface stays what a
real cluster serves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from tests.kube.apiserver import ApiServer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _number(request: web.Request, name: str, kind: type[float] | type[int], default: str) -> float:
    raw = request.query.get(name, default)
    try:
        return kind(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name}: expected a {kind.__name__}, got {raw!r}") from None


def control_app(server: ApiServer) -> web.Application:
    async def cut(request: web.Request) -> web.Response:
        abort = request.query.get("abort", "false") == "true"
        return web.json_response({"cut": server.cut_watches(abort=abort)})

    async def compact(request: web.Request) -> web.Response:
        rv = request.query.get("rv")
        target = int(_number(request, "rv", int, "0")) if rv else None
        return web.json_response({"compacted": server.compact(target)})

    async def fail_next(request: web.Request) -> web.Response:
        count = int(_number(request, "count", int, "1"))
        server.fail_next(count, int(_number(request, "code", int, "500")))
        return web.json_response({"fail_next": count})

    async def fail_fraction(request: web.Request) -> web.Response:
        fraction = _number(request, "fraction", float, "0")
        if not 0.0 <= fraction <= 1.0:
            raise web.HTTPBadRequest(text="fraction: expected a number in [0, 1]")
        server.fail_fraction(
            fraction,
            int(_number(request, "code", int, "500")),
            int(_number(request, "seed", int, "0")),
        )
        return web.json_response({"fail_fraction": fraction})

    async def delay(request: web.Request) -> web.Response:
        seconds = _number(request, "seconds", float, "0")
        if not 0.0 <= seconds <= 600.0:
            raise web.HTTPBadRequest(text="seconds: expected a number in [0, 600]")
        server.delay = seconds
        return web.json_response({"delay": seconds})

    async def clear(_: web.Request) -> web.Response:
        server.clear_faults()
        return web.json_response({})

    async def stop(_: web.Request) -> web.Response:
        await server.stop()
        return web.json_response({"running": server.running})

    async def start(_: web.Request) -> web.Response:
        await server.start()
        return web.json_response({"running": server.running, "port": server.port})

    async def bookmarks(_: web.Request) -> web.Response:
        server.send_bookmarks()
        return web.json_response({})

    async def requests(_: web.Request) -> web.Response:
        return web.json_response({f"{v} {r}": n for (v, r), n in server.requests.items()})

    app = web.Application()
    app.router.add_post("/cut-watches", cut)
    app.router.add_post("/compact", compact)
    app.router.add_post("/fail-next", fail_next)
    app.router.add_post("/fail-fraction", fail_fraction)
    app.router.add_post("/delay", delay)
    app.router.add_post("/clear-faults", clear)
    app.router.add_post("/stop", stop)
    app.router.add_post("/start", start)
    app.router.add_post("/bookmarks", bookmarks)
    app.router.add_get("/requests", requests)
    return app


async def start_control(server: ApiServer, port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve the control endpoint on 127.0.0.1:`port` (0: a free one); returns the port."""
    runner = web.AppRunner(control_app(server), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, runner.addresses[0][1]
