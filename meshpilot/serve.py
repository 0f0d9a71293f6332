"""`meshpilot serve`: wires sources, store, push, generation, xDS and monitoring.

With a kubeconfig or in-cluster, the Kubernetes parts (the cluster as a source, the CA
from Secrets with TokenReview, the leader's writers, the injection webhook) come from
meshpilot/serve_kube.py; start() returns once the cluster has synced, as istiod serves
nothing before its caches have.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
from collections.abc import Mapping
from typing import Any

import grpc
import structlog
from google.protobuf import json_format

from meshpilot.addresses import split_address
from meshpilot.analysis.reporter import FindingsReporter
from meshpilot.api.kinds import KINDS
from meshpilot.api.mesh import MeshConfig, load_mesh_config
from meshpilot.config import ConfigKey
from meshpilot.discovery.files import FileSource
from meshpilot.discovery.store import ConfigStore, kind_label
from meshpilot.model.push_context import PushContext
from meshpilot.model.push_request import PushRequest
from meshpilot.monitoring import http as monitoring_http
from meshpilot.monitoring import metrics
from meshpilot.settings import Settings
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
        self.store.subscribe_errors(self._count_errors)
        self._ready = False
        self._grpc: grpc.aio.Server | None = None
        self._monitoring: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self.xds_port = 0
        self.monitoring_port = 0
        self.secure: Any = None  # meshpilot.secure_port's SecurePort when --ca-dir is set
        self.secure_port = 0
        self.analysis = FindingsReporter()
        self.analysis_task: asyncio.Task[None] | None = None
        self.kube: Any = None  # meshpilot.serve_kube's KubeControlPlane in Kubernetes mode

    # --- pipeline ------------------------------------------------------------------------

    def _on_change(self, keys: frozenset[ConfigKey]) -> None:
        if self._ready:
            self.pusher.enqueue(PushRequest.for_changes(keys))
        self._count_objects({key.kind for key in keys})

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
        # After the push, not in it: one analysis of the newest context per loop turn.
        if self.analysis_task is None or self.analysis_task.done():
            self.analysis_task = asyncio.get_running_loop().create_task(self._analyze())

    async def _analyze(self) -> None:
        # Let the push's sends go out first, and fold a burst of pushes into one run.
        await asyncio.sleep(_ANALYSIS_DELAY)
        ctx = self.pusher.current
        if ctx is None:
            return
        try:
            self.analysis.update(ctx)
        except Exception:
            log.exception("config analysis failed", version=ctx.version)

    def _apply_mesh(self, mesh: MeshConfig) -> None:
        """A new MeshConfig from the cluster: in effect from the next (full) push."""
        self.mesh = mesh
        if self._ready:
            self.pusher.enqueue(PushRequest(full=True, reasons=frozenset({"mesh"})))

    def _count_objects(self, kinds: set[str] | None = None) -> None:
        # O(kinds) from the store's own counts: this runs after every change, and a
        # walk over the objects or errors here made loading N files cost O(N^2). After
        # a change only the kinds it touched (one commit per file at start-up).
        counts = self.store.object_counts()
        for kind in counts if kinds is None else kinds:
            metrics.CONFIG_OBJECTS.labels(kind).set(counts.get(kind, 0))

    def _count_errors(self, counts: Mapping[str, int]) -> None:
        # Every label is set each time, so that a kind whose errors are gone reads 0
        # and this store's figures replace those of any earlier server in the process.
        by_label = dict.fromkeys([*KINDS, "unknown"], 0)
        for kind, n in counts.items():
            by_label[kind_label(kind)] += n
        for label, n in by_label.items():
            metrics.CONFIG_ERRORS.labels(label).set(n)

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self.settings.validate()
        host, port = split_address(self.settings.monitoring_address)
        self._monitoring = await monitoring_http.start(self, host, port)
        self.monitoring_port = self._monitoring.addresses[0][1]
        # The initial load allocates millions of long-lived objects: collecting while
        # it runs only walks them again and again. The serve command calls tune_gc()
        # right after start() (collect once, freeze what is long-lived).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            if self.files is not None:
                await self.files.load_initial()
            if self.settings.kubernetes:
                await self._start_kube_source()
            self._count_objects()
            self._count_errors(self.store.error_counts())
            await self.pusher.init()
        finally:
            if gc_was_enabled:
                gc.enable()
        self._grpc = xds_server.create_server(self.discovery)
        self.xds_port = xds_server.bind(self._grpc, self.settings.xds_address)
        await self._grpc.start()
        if self.settings.ca_dir is not None or self.kube is not None:
            await self._start_ca()
        self._ready = True
        self.pusher.start()
        if self.files is not None:
            self._tasks.append(asyncio.create_task(self.files.run(), name="file-source"))
        elif self.kube is None:
            # Not an error (config may be pushed in by tests or added later), but a
            # silent empty mesh looks like a broken one.
            log.warning(
                "no config source: serving an empty mesh",
                hint="give config with --config-dir DIR (repeatable) or "
                f"MESHPILOT_CONFIG_DIR=DIR[{os.pathsep}DIR...]",
            )
        log.info(
            "meshpilot serving",
            xds=f"{split_address(self.settings.xds_address)[0]}:{self.xds_port}",
            monitoring=f"{host}:{self.monitoring_port}",
            objects=len(self.store.snapshot()),
            errors=len(self.store.errors()),
        )

    async def _start_kube_source(self) -> None:
        from meshpilot.serve_kube import KubeControlPlane

        self.kube = KubeControlPlane(self.settings, self.store)
        # --mesh-config wins over the cluster's `istio` ConfigMap, as a file given to
        # istiod does.
        listener = self._apply_mesh if self.settings.mesh_config is None else None
        await self.kube.start_source(listener)

    async def _start_ca(self) -> None:
        from meshpilot.secure_port import start_secure_port

        trust_domain = self.settings.trust_domain or self.mesh.trust_domain
        ca = None
        extra: list[Any] = []
        if self.kube is not None:
            # istiod's CA is always on in a cluster: from Secrets unless --ca-dir is given.
            if self.settings.ca_dir is None:
                ca = await self.kube.load_ca(trust_domain)
            extra.append(self.kube.authenticator(trust_domain))
        self.secure = await start_secure_port(
            self.settings, self.mesh, self.discovery, ca=ca, extra_authenticators=extra
        )
        self.secure_port = self.secure.port
        if self.kube is not None:
            await self.kube.start_ca_users(self.secure.ca)

    async def stop(self) -> None:
        self._ready = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.pusher.stop()
        if self.analysis_task is not None:
            self.analysis_task.cancel()
        if self.kube is not None:
            await self.kube.stop()
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
        if ctx is not None:
            self.analysis.update(ctx)  # a no-op when the push already analyzed it
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
            "kubernetes": self.kube.status() if self.kube is not None else None,
            "analysis": [m.to_dict() for m in self.analysis.messages] if ctx else [],
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


def tune_gc() -> None:
    """Keep the cyclic collector off the push path.

    The store, the first push context and the shared serialized config are long-lived
    and hold millions of objects; every full collection walked them all again (tens of
    ms in the middle of an endpoint push at 1000 proxies). Freeze what exists after the
    initial load and collect the young generation less often. Process-wide, so only the
    `meshpilot serve` command calls it (after start()), never a library user or a test.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, _GC_GEN0), gen1, gen2)


_GC_GEN0 = 20_000
_ANALYSIS_DELAY = 0.1
