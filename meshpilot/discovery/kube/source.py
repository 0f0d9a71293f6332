"""The Kubernetes source: a cluster's Services, EndpointSlices, Pods, Nodes, Namespaces and
Istio config, followed by informers, into the config store.

istiod reads Kubernetes through shared informers: its service registry controller
(Services, EndpointSlices, Pods, Nodes, Namespaces), its CRD config client (Istio's
networking and security kinds, at a version found through API discovery), and the mesh
ConfigMap. meshpilot does the same, with these differences:

- Every object is one store origin, named `Kind ns/name (cluster ID)`, holding its
  Config or its validation error, just like a file holds its documents in the file
  source. An invalid update leaves the last good version in effect.
- discoverySelectors (from the mesh ConfigMap) filter every namespaced kind, Istio's
  CRDs included, as recent Istio versions do; Namespace objects themselves enter the
  store only when selected. The system namespace is always selected. Relabelling a
  namespace, or changing the selectors, adds or removes its objects at once.
- An Istio kind whose CRD is not served is reported in `status()` and looked up again
  every `crd_recheck` seconds; it does not hold readiness back (istiod likewise starts
  without the CRDs it cannot find).
- `synced` is set once every started informer has completed its first list. While the
  API server is unreachable nothing is removed from the store: the informers keep their
  last state, and `status()`, the logs and `meshpilot_kube_informer_connected` show the
  outage.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from meshpilot.api.errors import ConfigError
from meshpilot.api.mesh import MeshConfig
from meshpilot.discovery.kube import convert
from meshpilot.discovery.kube.convert import KindSpec
from meshpilot.discovery.kube.informer import (
    MAX_OBJECT_BYTES,
    MAX_OBJECTS,
    PAGE_SIZE,
    Informer,
)
from meshpilot.discovery.kube.mesh import MESH_CONFIGMAP, MeshView, parse_mesh
from meshpilot.discovery.kube.resource import InformerEvent, ObjectKey
from meshpilot.discovery.store import ConfigStore
from meshpilot.kube.backoff import Backoff
from meshpilot.kube.names import object_name

log = structlog.get_logger(__name__)

DEFAULT_CLUSTER_ID = "Kubernetes"
_CONFIGMAP = KindSpec("ConfigMap", "", "v1", "configmaps")
_AUTH = ["BearerToken"]


class KubeSource:
    """Feeds `store` from one cluster. `await start()`, then `await synced.wait()`."""

    def __init__(
        self,
        store: ConfigStore,
        api_client: ApiClient,
        cluster_id: str = DEFAULT_CLUSTER_ID,
        system_namespace: str = "istio-system",
        *,
        page_size: int = PAGE_SIZE,
        max_objects: int = MAX_OBJECTS,
        max_object_bytes: int = MAX_OBJECT_BYTES,
        request_timeout: float = 60.0,
        backoff: Callable[[], Backoff] = Backoff,
        crd_recheck: float = 30.0,
    ) -> None:
        self._store = store
        self._api = api_client
        self.cluster_id = cluster_id
        self.system_namespace = system_namespace
        self._options: dict[str, Any] = {
            "page_size": page_size,
            "max_objects": max_objects,
            "max_object_bytes": max_object_bytes,
            "request_timeout": request_timeout,
        }
        self._request_timeout = request_timeout
        self._backoff = backoff
        self._crd_recheck = crd_recheck
        self.synced = asyncio.Event()
        self.view = MeshView()
        self.mesh_errors: list[ConfigError] = []
        self._mesh_listeners: list[Callable[[MeshConfig], None]] = []
        self._informers: dict[str, Informer] = {}
        self._specs: dict[str, KindSpec] = {}
        self.not_served: dict[str, str] = {}
        # Namespaces whose objects are in the store now.
        self._selected: set[str] = {system_namespace}
        # False until namespaces and the mesh ConfigMap are both listed.
        self._view_ready = False
        self._tasks: list[asyncio.Task[None]] = []

    # --- public ---------------------------------------------------------------------------

    @property
    def mesh_config(self) -> MeshConfig:
        return self.view.mesh_config

    def on_mesh_config(self, listener: Callable[[MeshConfig], None]) -> None:
        """`listener(mesh_config)` whenever the mesh ConfigMap changes what is in effect."""
        self._mesh_listeners.append(listener)

    async def start(self) -> None:
        """Start following the cluster; returns at once (see `synced`)."""
        if not self._tasks:
            task = asyncio.create_task(self._run(), name="kube source")
            task.add_done_callback(_log_failure)
            self._tasks.append(task)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a task stuck in the HTTP client must not hold up shutdown.
            await asyncio.wait(tasks, timeout=5.0)
        await asyncio.gather(*(i.stop() for i in self._informers.values()))

    def status(self) -> dict[str, Any]:
        """For /debug/configz: readiness, connection and the last error of each informer."""
        informers = [i.status() for i in self._informers.values()]
        return {
            "clusterID": self.cluster_id,
            "systemNamespace": self.system_namespace,
            "synced": self.synced.is_set(),
            "connected": bool(informers) and all(i["connected"] for i in informers),
            "informers": informers,
            "notServed": dict(self.not_served),
            "discoverySelectors": (
                None
                if self.view.discovery_selectors is None
                else [s.model_dump(by_alias=True) for s in self.view.discovery_selectors]
            ),
            "meshConfigErrors": [str(e) for e in self.mesh_errors],
        }

    def informer(self, kind: str) -> Informer | None:
        return self._informers.get(kind)

    # --- start-up -------------------------------------------------------------------------

    async def _run(self) -> None:
        # Namespaces and the mesh ConfigMap first: until their labels and the selectors
        # are known, no object can be placed in or out of view.
        namespaces = self._add(convert.NAMESPACE, self._on_namespace)
        mesh = self._add(
            _CONFIGMAP,
            self._on_mesh,
            namespace=self.system_namespace,
            field_selector=f"metadata.name={MESH_CONFIGMAP}",
        )
        await asyncio.gather(namespaces.synced.wait(), mesh.synced.wait())
        self._view_ready = True
        self._reselect({name for _, name in namespaces.items()})
        for spec in convert.BUILTIN:
            self._add(spec, self._handler(spec))
        missing = await self._discover(convert.ISTIO)
        await asyncio.gather(*(i.synced.wait() for i in self._informers.values()))
        if not self.synced.is_set():
            log.info(
                "kubernetes source synced",
                cluster=self.cluster_id,
                objects=sum(len(i) for i in self._informers.values()),
                not_served=sorted(self.not_served),
            )
            self.synced.set()
        while missing:
            await asyncio.sleep(self._crd_recheck)
            missing = await self._discover(missing)

    def _add(
        self,
        spec: KindSpec,
        handler: Callable[[InformerEvent], None],
        version: str | None = None,
        **kw: Any,
    ) -> Informer:
        informer = Informer(
            self._api, spec.resource(version), backoff=self._backoff(), **self._options, **kw
        )
        informer.add_handler(handler)
        self._informers[spec.kind] = informer
        self._specs[spec.kind] = spec
        informer.start()
        return informer

    async def _discover(self, specs: tuple[KindSpec, ...]) -> tuple[KindSpec, ...]:
        """Start an informer for each kind at its preferred served version; returns the
        kinds not served. Retries (with backoff) until discovery itself answers."""
        backoff = self._backoff()
        while True:
            try:
                served = {g: await self._served(g) for g in {s.group for s in specs}}
                break
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("kubernetes API discovery failed, retrying", error=str(e))
                await asyncio.sleep(backoff.next())
        missing = []
        for spec in specs:
            version = next(
                (v for v in convert.ISTIO_VERSIONS if spec.plural in served[spec.group].get(v, ())),
                None,
            )
            if version is None:
                why = f"{spec.plural}.{spec.group} is not served in any of " + ", ".join(
                    convert.ISTIO_VERSIONS
                )
                if self.not_served.get(spec.kind) != why:
                    log.warning("istio kind not served, not watched", kind=spec.kind, reason=why)
                self.not_served[spec.kind] = why
                missing.append(spec)
                continue
            self.not_served.pop(spec.kind, None)
            log.info("watching istio kind", kind=spec.kind, version=f"{spec.group}/{version}")
            self._add(spec, self._handler(spec), version)
        return tuple(missing)

    async def _served(self, group: str) -> dict[str, set[str]]:
        """Version -> resource names that `group` serves; empty when the group is absent."""
        try:
            doc = await self._get(f"/apis/{group}")
        except ApiException as e:
            if e.status == 404:
                return {}
            raise
        out: dict[str, set[str]] = {}
        for entry in doc.get("versions") or []:
            version = entry.get("version") if isinstance(entry, dict) else None
            if version not in convert.ISTIO_VERSIONS:
                continue
            resources = await self._get(f"/apis/{group}/{version}")
            out[version] = {
                r["name"]
                for r in resources.get("resources") or []
                if isinstance(r, dict) and isinstance(r.get("name"), str)
            }
        return out

    async def _get(self, path: str) -> dict[str, Any]:
        body = await self._api.call_api(
            path,
            "GET",
            response_types_map={200: "object"},
            auth_settings=_AUTH,
            _return_http_data_only=True,
            _request_timeout=self._request_timeout,
        )
        if not isinstance(body, dict):
            raise ValueError(f"{path}: expected an object")
        return body

    # --- events ---------------------------------------------------------------------------

    def _handler(self, spec: KindSpec) -> Callable[[InformerEvent], None]:
        def handle(event: InformerEvent) -> None:
            self._sync(spec, event.key)

        return handle

    def _sync(self, spec: KindSpec, key: ObjectKey) -> None:
        """Make the store hold what the informer holds for `key`, if it is in view."""
        informer = self._informers[spec.kind]
        obj = informer.get(key)
        origin = object_name(spec.kind, key[0], key[1], self.cluster_id)
        in_view = key[0] in self._selected if spec.namespaced else True
        if spec is convert.NAMESPACE:
            in_view = key[1] in self._selected
        if obj is None or not in_view:
            self._store.remove_origin(origin)
            return
        try:
            parsed = convert.to_config(spec.kind, obj, self.cluster_id)
        except Exception as e:
            # The API server's objects are outside input too: a shape no model expected
            # is this object's error, not the end of the informer.
            parsed = ConfigError(
                origin, f"unreadable object: {type(e).__name__}: {e}", None, spec.kind, *key
            )
        if isinstance(parsed, ConfigError):
            self._store.set_origin(origin, [], [parsed])
        else:
            self._store.set_origin(origin, [parsed])

    def _on_namespace(self, event: InformerEvent) -> None:
        if self._view_ready:
            self._reselect({event.key[1]})

    def _on_mesh(self, event: InformerEvent) -> None:
        informer = self._informers[_CONFIGMAP.kind]
        cm = informer.get(event.key)
        origin = object_name("ConfigMap", self.system_namespace, MESH_CONFIGMAP, self.cluster_id)
        parsed = parse_mesh(cm, origin)
        if isinstance(parsed, ConfigError):
            # The last good MeshConfig stays in effect.
            self.mesh_errors = [parsed]
            self._store.set_origin(origin, [], [parsed])
            return
        self.mesh_errors = []
        self._store.remove_origin(origin)
        changed_mesh = parsed.mesh_config != self.view.mesh_config
        self.view = parsed
        if changed_mesh:
            log.info("mesh config from the istio ConfigMap in effect", origin=origin)
            for listener in self._mesh_listeners:
                try:
                    listener(parsed.mesh_config)
                except Exception:
                    log.exception("mesh config listener failed")
        if self._view_ready:
            namespaces = self._informers[convert.NAMESPACE.kind]
            self._reselect({name for _, name in namespaces.items()} | set(self._selected))

    def _reselect(self, names: set[str]) -> None:
        """Recompute whether each namespace in `names` is in view, and move the objects
        of those that entered or left."""
        namespaces = self._informers[convert.NAMESPACE.kind]
        moved: set[str] = set()
        for name in names:
            ns = namespaces.get(("", name))
            selected = name == self.system_namespace or (
                ns is not None and self.view.selects(_labels(ns))
            )
            if selected and name not in self._selected:
                self._selected.add(name)
                moved.add(name)
            elif not selected and name in self._selected:
                self._selected.discard(name)
                moved.add(name)
            # The Namespace object itself: labels may have changed either way.
            self._sync(convert.NAMESPACE, ("", name))
        if not moved:
            return
        log.info(
            "namespaces moved in or out of view",
            entered=sorted(moved & self._selected),
            left=sorted(moved - self._selected),
        )
        for kind, informer in self._informers.items():
            spec = self._specs[kind]
            if not spec.namespaced or spec is _CONFIGMAP:
                continue
            for key in [k for k in informer.items() if k[0] in moved]:
                self._sync(spec, key)


def _labels(ns: Mapping[str, Any]) -> Mapping[str, str]:
    labels = (ns.get("metadata") or {}).get("labels") or {}
    return labels if isinstance(labels, dict) else {}


def _log_failure(task: asyncio.Task[None]) -> None:
    # A bug in start-up must not pass silently: the source would never become ready.
    if not task.cancelled() and task.exception() is not None:
        log.error("kubernetes source stopped", error=repr(task.exception()))
