"""`meshpilot serve`: wires sources, store, push, generation, xDS and monitoring."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
from typing import Any

import grpc
import structlog
from google.protobuf import json_format

from meshpilot.api.mesh import MeshConfig, load_mesh_config
from meshpilot.discovery.files import FileSource
from meshpilot.discovery.store import ConfigStore
from meshpilot.model import analysis
from meshpilot.model.config import ConfigKey
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.monitoring import http as monitoring_http
from meshpilot.monitoring import metrics
from meshpilot.settings import Settings, split_address
from meshpilot.xds import server as xds_server
from meshpilot.xds import typeurls
from meshpilot.xds.generator import ConfigGenerator
from meshpilot.xds.push import Pusher

log = structlog.get_logger(__name__)

_DUMP_SECTIONS = (
    (typeurls.CLUSTER, "ClustersConfigDump", "dynamic_active_clusters", "cluster"),
    (typeurls.ENDPOINT, "EndpointsConfigDump", "dynamic_endpoint_configs", "endpoint_config"),
    (typeurls.LISTENER, "ListenersConfigDump", "dynamic_listeners", "listener"),
    (typeurls.ROUTE, "RoutesConfigDump", "dynamic_route_configs", "route_config"),
)


class MeshServer:
    """One control plane process. `start()` returns once xDS and monitoring listen."""

    def __init__(self, settings: Settings, mesh: MeshConfig | None = None) -> None:
        self.settings = settings
        self.mesh = mesh or load_mesh_config(settings.mesh_config)
        self.store = ConfigStore()
        self.generator = ConfigGenerator()
        self.discovery = xds_server.DiscoveryServer(self.generator)
        self.pusher: Pusher[PushContext] = Pusher(
            self._build_context,
            self._push,
            debounce_after=settings.debounce_after,
            debounce_max=settings.debounce_max,
        )
        self.files = FileSource(self.store, settings.config_dirs) if settings.config_dirs else None
        self.store.subscribe(self._on_change)
        self._ready = False
        self._grpc: grpc.aio.Server | None = None
        self._monitoring: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self.xds_port = 0
        self.monitoring_port = 0
        self.secure: Any = None  # meshpilot.ca.secure.SecurePort when --ca-dir is set
        self.secure_port = 0

    # --- pipeline ------------------------------------------------------------------------

    def _on_change(self, keys: frozenset[ConfigKey]) -> None:
        if self._ready:
            self.pusher.enqueue(PushRequest.for_changes(keys))
        self._count_config()

    def _build_context(self, previous: PushContext | None, request: PushRequest) -> PushContext:
        snapshot = self.store.snapshot()
        if previous is not None and not request.full:
            ctx = previous.with_endpoint_changes(snapshot, request.config_keys)
        else:
            ctx = PushContext.build(snapshot, self.mesh)
        self.generator.on_new_context(previous, ctx)
        metrics.SERVICES.set(len(ctx.services))
        return ctx

    def _push(self, request: PushRequest, ctx: PushContext) -> None:
        # Carry the changed hosts in the request itself: a connection that coalesces
        # several endpoint pushes must resend the union, not only the latest.
        if ctx.changed_hosts:
            request = dataclasses.replace(request, eds_hosts=request.eds_hosts | ctx.changed_hosts)
        if ctx.requires_full_push and not request.full:
            # Endpoints changed the SPIFFE identities clusters verify (auto mTLS): CDS too.
            request = dataclasses.replace(request, full=True)
        self.discovery.push(request, ctx)

    def _count_config(self) -> None:
        snap = self.store.snapshot()
        for kind, objs in snap.by_kind.items():
            metrics.CONFIG_OBJECTS.labels(kind).set(len(objs))
        by_kind: dict[str, int] = {}
        for err in self.store.errors():
            by_kind[err.kind or "unknown"] = by_kind.get(err.kind or "unknown", 0) + 1
        for kind in set(by_kind) | {"unknown"}:
            metrics.CONFIG_ERRORS.labels(kind).set(by_kind.get(kind, 0))

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.settings.validate()
        host, port = split_address(self.settings.monitoring_address)
        self._monitoring = await monitoring_http.start(self, host, port)
        self.monitoring_port = self._monitoring.addresses[0][1]
        if self.files is not None:
            await self.files.load_initial()
        self._count_config()
        await self.pusher.init()
        _tune_gc()
        self._grpc = xds_server.create_server(self.discovery)
        self.xds_port = xds_server.bind(self._grpc, self.settings.xds_address)
        await self._grpc.start()
        if self.settings.ca_dir is not None:
            from meshpilot.ca.secure import start_secure_port

            self.secure = await start_secure_port(self.settings, self.mesh, self.discovery)
            self.secure_port = self.secure.port
        self._ready = True
        self.pusher.start()
        if self.files is not None:
            self._tasks.append(asyncio.create_task(self.files.run(), name="file-source"))
        log.info(
            "meshpilot serving",
            xds=f"{split_address(self.settings.xds_address)[0]}:{self.xds_port}",
            monitoring=f"{host}:{self.monitoring_port}",
            objects=len(self.store.snapshot()),
            errors=len(self.store.errors()),
        )

    async def stop(self) -> None:
        self._ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.pusher.stop()
        if self.secure is not None:
            await self.secure.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace=0.5)
        if self._monitoring is not None:
            await self._monitoring.cleanup()

    # --- Debuggable (monitoring/http.py) -------------------------------------------------

    def is_ready(self) -> bool:
        return self._ready

    def sync_status(self) -> list[dict[str, Any]]:
        entries = self.discovery.sync_status()
        for e in entries:
            e["connected_at"] = monitoring_http.rfc3339(e.get("connected_at"))
        return entries

    def proxy_ids(self) -> list[str]:
        return sorted({c.proxy.id for c in self.discovery.connections})

    def configz(self) -> dict[str, Any]:
        snap = self.store.snapshot()
        ctx = self.pusher.current
        # Analysis runs on demand and once per context version: a push never pays for it.
        cached: tuple[str, list[analysis.Message]] | None = self.__dict__.get("_analysis")
        if ctx is not None and (cached is None or cached[0] != ctx.version):
            found = analysis.analyze(ctx)
            before = set(cached[1]) if cached is not None else set()
            for m in found:
                if m not in before:
                    log.warning("config analysis", finding=str(m), code=m.code)
            cached = self.__dict__["_analysis"] = (ctx.version, found)
        return {
            "version": ctx.version if ctx else "",
            "objects": [
                {
                    "kind": cfg.kind,
                    "namespace": cfg.namespace,
                    "name": cfg.name,
                    "origin": cfg.origin,
                    "revision": cfg.revision,
                }
                for kind in sorted(snap.by_kind)
                for cfg in sorted(snap.by_kind[kind].values(), key=lambda c: c.key)
            ],
            "errors": [dict(e.to_dict(), text=str(e)) for e in self.store.errors()],
            "services": sorted(ctx.services) if ctx else [],
            "files": _files_stats(self.files) if self.files is not None else None,
            "analysis": [m.to_dict() for m in cached[1]] if cached is not None else [],
        }

    def config_dump(self, proxy_id: str) -> dict[str, Any] | None:
        conns = self.discovery.connections_for(proxy_id)
        if not conns:
            return None
        conn = conns[-1]
        configs = []
        for type_url, dump_type, section, field in _DUMP_SECTIONS:
            w = conn.watched.get(type_url)
            version = w.version_sent if w is not None else ""
            entries = []
            for name, res in sorted(conn.sent_resources(type_url).items()):
                # Envoy's admin /config_dump spells fields as in the protos (snake_case).
                body = json_format.MessageToDict(res.body, preserving_proto_field_name=True)
                body.pop("@type", None)
                entry: dict[str, Any] = {"version_info": res.version, field: body}
                if field == "listener":
                    entry = {"name": name, "active_state": entry}
                entries.append(entry)
            configs.append(
                {
                    "@type": f"type.googleapis.com/envoy.admin.v3.{dump_type}",
                    "version_info": version,
                    section: entries,
                }
            )
        return {"proxy": proxy_id, "configs": configs}


def _files_stats(files: FileSource) -> dict[str, Any]:
    stats = files.stats()
    stats["last_change"] = monitoring_http.rfc3339(stats.get("last_change"))
    return stats


def _tune_gc() -> None:
    """Keep the cyclic collector off the push path.

    The store, the first push context and the shared serialized config are long-lived
    and hold millions of objects; every full collection walked them all again (tens of
    ms in the middle of an endpoint push at 1000 proxies). Freeze what exists after the
    initial load and collect the young generation less often.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, _GC_GEN0), gen1, gen2)


_GC_GEN0 = 20_000
