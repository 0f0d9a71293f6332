"""Monitoring and debug HTTP (Istio's 15014): /ready, /metrics, /debug/*.

As in istiod: `/debug/config_dump?proxyID=` takes the pod as `POD.NAMESPACE` (what
istioctl passes; a bare `POD` means namespace `default`) or the full node id
`TYPE~IP~POD.NAMESPACE~DOMAIN`. The dump itself uses Envoy's admin field names
(snake_case), so it reads like Envoy's own `/config_dump`. Times are RFC 3339 in
UTC. `/metrics` has no `*_created` series: istiod's `/metrics` has none
and they double the scrape for no information a dashboard uses.
"""

from __future__ import annotations

import datetime
import json
from typing import Any, Protocol

import prometheus_client
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from meshpilot.monitoring.metrics import REGISTRY

# Process-wide, read when samples are collected: one call covers every metric.
prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]


class Debuggable(Protocol):
    """What the monitoring server reads from the running control plane."""

    def is_ready(self) -> bool: ...

    def sync_status(self) -> list[dict[str, Any]]: ...

    def configz(self) -> dict[str, Any]: ...

    def config_dump(self, proxy_id: str) -> dict[str, Any] | None: ...

    def proxy_ids(self) -> list[str]: ...


def rfc3339(when: float | datetime.datetime | None) -> str | None:
    """A Unix time (or aware datetime) as RFC 3339 in UTC, e.g. 2026-12-04T17:03:00Z.

    0 and None mean "never" and stay None (JSON null), not 1970.
    """
    if when is None or when == 0:
        return None
    if not isinstance(when, datetime.datetime):
        when = datetime.datetime.fromtimestamp(when, datetime.UTC)
    return when.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _default(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return rfc3339(value)
    return str(value)


def resolve_proxy_id(requested: str, known: list[str]) -> str | None:
    """The connected proxy's node id for `requested`: a node id, `POD.NS` or `POD`."""
    if requested in known:
        return requested
    if "~" in requested:
        return None
    pod_ns = requested if "." in requested else f"{requested}.default"
    # Node ids are TYPE~IP~POD.NS~DOMAIN; the last connected one wins, as for the id.
    found = [k for k in known if k.count("~") == 3 and k.split("~")[2] == pod_ns]
    return found[-1] if found else None


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, indent=2, sort_keys=False, default=_default) + "\n",
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
        known = target.proxy_ids()
        node_id = resolve_proxy_id(proxy_id, known)
        dump = target.config_dump(node_id) if node_id is not None else None
        if dump is None:
            return _json(
                {
                    "error": f"proxy {proxy_id!r} is not connected"
                    " (proxyID takes POD.NAMESPACE or a node id)",
                    "proxies": known,
                },
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
                    "/debug/config_dump?proxyID=POD.NAMESPACE",
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
