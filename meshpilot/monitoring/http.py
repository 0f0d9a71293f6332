"""Monitoring and debug HTTP (Istio's 15014): /ready, /metrics, /debug/*."""

from __future__ import annotations

import json
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshpilot.monitoring.metrics import REGISTRY


class Debuggable(Protocol):
    """What the monitoring server reads from the running control plane."""

    def is_ready(self) -> bool: ...

    def sync_status(self) -> list[dict[str, Any]]: ...

    def configz(self) -> dict[str, Any]: ...

    def config_dump(self, proxy_id: str) -> dict[str, Any] | None: ...

    def proxy_ids(self) -> list[str]: ...


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=2, sort_keys=False, default=str) + "\n",
        status=status,
        content_type="application/json",
    )


def build_app(target: Debuggable) -> web.Application:
    async def ready(_: web.Request) -> web.Response:
        if target.is_ready():
            return web.Response(text="ready\n")
        return web.Response(text="not ready: initial config not loaded yet\n", status=503)

    async def metrics(_: web.Request) -> web.Response:
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def syncz(_: web.Request) -> web.Response:
        return _json(target.sync_status())

    async def configz(_: web.Request) -> web.Response:
        return _json(target.configz())

    async def config_dump(request: web.Request) -> web.Response:
        proxy_id = request.query.get("proxyID", "")
        if not proxy_id:
            return _json(
                {"error": "query parameter proxyID is required", "proxies": target.proxy_ids()},
                400,
            )
        dump = target.config_dump(proxy_id)
        if dump is None:
            return _json(
                {"error": f"proxy {proxy_id!r} is not connected", "proxies": target.proxy_ids()},
                404,
            )
        return _json(dump)

    async def index(_: web.Request) -> web.Response:
        return _json(
            {
                "endpoints": [
                    "/ready",
                    "/metrics",
                    "/debug/syncz",
                    "/debug/configz",
                    "/debug/config_dump?proxyID=ID",
                ]
            }
        )

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/stats/prometheus", metrics)
    app.router.add_get("/debug/syncz", syncz)
    app.router.add_get("/debug/configz", configz)
    app.router.add_get("/debug/config_dump", config_dump)
    app.router.add_get("/debug", index)
    app.router.add_get("/", index)
    return app


async def start(target: Debuggable, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(build_app(target), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    return runner
