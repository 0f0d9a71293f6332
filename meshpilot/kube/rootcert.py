"""The root certificate in every mesh namespace: ConfigMap `istio-ca-root-cert`.

What Istio does (pilot/pkg/serviceregistry/kube/controller/namespacecontroller.go): the
leader of `istio-namespace-controller-election` keeps a ConfigMap `istio-ca-root-cert`,
labelled `istio.io/config: "true"`, with the mesh's root certificate under
`root-cert.pem`, in every namespace except the system ones Istio never injects
(kube-system, kube-public, kube-node-lease, local-path-storage). It watches namespaces
and those ConfigMaps (by name), writes the ConfigMap when a namespace appears, puts the
content back when someone edits it, recreates it when someone deletes it, and rewrites
every one when the root changes. Workloads mount it to verify istiod.

meshpilot's RootCertPublisher does the same while it runs: run it as the leader's work
(LeaderElector cancels it when leadership ends, so a follower never writes). Writes are
create, and update (PUT with the resourceVersion read, a 409 means it changed under us
and the namespace is synced again); never server-side apply. Namespaces come from a
callable that returns a fresh stream of namespace events each time the publisher starts,
so the Kubernetes source can feed it; `namespace_events()` is a plain list+watch for use
without one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio.client import ApiClient, CoreV1Api, V1ConfigMap, V1ObjectMeta
from kubernetes_asyncio.client.exceptions import ApiException

from meshpilot.kube.backoff import Backoff
from meshpilot.kube.leader import NAMESPACE_CONTROLLER, LeaderElector, Timings
from meshpilot.kube.listwatch import RELISTED, WatchEvent, list_watch
from meshpilot.kube.names import object_name

log = structlog.get_logger(__name__)

CONFIGMAP_NAME = "istio-ca-root-cert"
DATA_KEY = "root-cert.pem"
LABELS = {"istio.io/config": "true"}
# Istio's inject.IgnoredNamespaces: no workloads of the mesh run there.
IGNORED_NAMESPACES = frozenset(
    {"kube-system", "kube-public", "kube-node-lease", "local-path-storage"}
)

NamespaceEvents = Callable[[], AsyncIterator[WatchEvent]]


def namespace_events(api: ApiClient, **kw: Any) -> NamespaceEvents:
    """Namespace events from a list+watch of the cluster's namespaces."""
    core = CoreV1Api(api)
    return lambda: list_watch(api, core.list_namespace, "namespaces", **kw)


def root_cert_election(
    api: ApiClient,
    publisher: RootCertPublisher,
    system_namespace: str = "istio-system",
    *,
    identity: str | None = None,
    timings: Timings | None = None,
) -> LeaderElector:
    """The elector that runs `publisher` while this replica holds Istio's
    `istio-namespace-controller-election` lease; `await elector.run()` as a task."""
    return LeaderElector(
        api,
        system_namespace,
        NAMESPACE_CONTROLLER,
        publisher.run,
        identity=identity,
        timings=timings,
    )


class RootCertPublisher:
    """Keeps `istio-ca-root-cert` in every mesh namespace equal to the current root.

    `await run()` while leading; `set_root()` whenever the CA's roots change (it may be
    called at any time, leading or not).
    """

    def __init__(
        self,
        api: ApiClient,
        root_cert_pem: str,
        namespaces: NamespaceEvents,
        *,
        ignored: Iterable[str] = IGNORED_NAMESPACES,
        cluster_id: str | None = None,
        watch_kw: dict[str, Any] | None = None,
        backoff: Callable[[], Backoff] = Backoff,
    ) -> None:
        if not root_cert_pem.strip():
            raise ValueError("the root certificate to publish is empty")
        self._api = api
        self._core = CoreV1Api(api)
        self._root = root_cert_pem
        self._namespace_events = namespaces
        self._ignored = frozenset(ignored)
        self._cluster_id = cluster_id
        self._watch_kw = watch_kw or {}
        self._new_backoff = backoff
        self._namespaces: set[str] = set()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._failures: dict[str, Backoff] = {}
        # Writes made, by verb ("create", "update"): for tests and debugging.
        self.writes: Counter[str] = Counter()

    @property
    def root_cert_pem(self) -> str:
        return self._root

    def set_root(self, root_cert_pem: str) -> None:
        """A new root: every namespace's ConfigMap is rewritten."""
        if not root_cert_pem.strip():
            raise ValueError("the root certificate to publish is empty")
        if root_cert_pem == self._root:
            return
        self._root = root_cert_pem
        log.info("root certificate changed; updating ConfigMaps", namespaces=len(self._namespaces))
        for ns in self._namespaces:
            self._enqueue(ns)

    async def run(self) -> None:
        """Watch namespaces and the ConfigMaps, and write, until cancelled."""
        self._namespaces.clear()
        self._queue = asyncio.Queue()
        self._queued.clear()
        self._failures.clear()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._forever("namespaces", self._follow_namespaces))
            tg.create_task(self._forever("configmaps", self._follow_configmaps))
            tg.create_task(self._worker())

    async def _forever(self, what: str, follow: Callable[[], Awaitable[None]]) -> None:
        """Follow an event stream; if it fails or ends, start it again (after a pause)."""
        backoff = self._new_backoff()
        while True:
            try:
                await follow()
                log.warning("root certificate publisher: event stream ended", stream=what)
            except Exception:
                log.exception("root certificate publisher: event stream failed", stream=what)
            await asyncio.sleep(backoff.next())

    # -- inputs --

    def _wanted(self, ns: str) -> bool:
        return ns not in self._ignored

    async def _follow_namespaces(self) -> None:
        async for event in self._namespace_events():
            if event.type == RELISTED:
                names = {_name(o) for o in event.objects if _live(o)}
                self._namespaces = {n for n in names if self._wanted(n)}
                for ns in self._namespaces:
                    self._enqueue(ns)
                continue
            name = _name(event.obj)
            if not name or not self._wanted(name):
                continue
            if event.type == "DELETED" or not _live(event.obj):
                self._namespaces.discard(name)
            elif name not in self._namespaces:
                self._namespaces.add(name)
                self._enqueue(name)

    async def _follow_configmaps(self) -> None:
        events = list_watch(
            self._api,
            self._core.list_config_map_for_all_namespaces,
            f"ConfigMaps {CONFIGMAP_NAME}",
            field_selector=f"metadata.name={CONFIGMAP_NAME}",
            **self._watch_kw,
        )
        async for event in events:
            if event.type == RELISTED:
                # Deletions while the watch was down show only as absences: check all.
                for ns in self._namespaces:
                    self._enqueue(ns)
                continue
            ns = event.obj.get("metadata", {}).get("namespace", "")
            if ns not in self._namespaces:
                continue
            if event.type == "DELETED" or not self._is_current(event.obj):
                self._enqueue(ns)

    def _is_current(self, obj: dict[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        labels = meta.get("labels") or {}
        data = obj.get("data") or {}
        return data.get(DATA_KEY) == self._root and all(
            labels.get(k) == v for k, v in LABELS.items()
        )

    def _enqueue(self, ns: str) -> None:
        if ns not in self._queued:
            self._queued.add(ns)
            self._queue.put_nowait(ns)

    # -- writes --

    async def _worker(self) -> None:
        while True:
            ns = await self._queue.get()
            self._queued.discard(ns)
            if ns not in self._namespaces:
                continue
            try:
                await self._sync(ns)
            except ApiException as e:
                self._retry_later(ns, f"{e.status} {e.reason}")
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                self._retry_later(ns, str(e) or type(e).__name__)
            except Exception as e:
                # A surprise in one namespace must not stop the others being kept.
                log.exception("root certificate ConfigMap sync failed", configmap=self._what(ns))
                self._retry_later(ns, type(e).__name__)
            else:
                self._failures.pop(ns, None)

    def _retry_later(self, ns: str, error: str) -> None:
        backoff = self._failures.setdefault(ns, self._new_backoff())
        delay = backoff.next()
        log.warning(
            "root certificate ConfigMap not written; retrying",
            configmap=self._what(ns),
            error=error,
            retry_in=round(delay, 2),
        )
        asyncio.get_running_loop().call_later(delay, self._enqueue, ns)

    async def _sync(self, ns: str) -> None:
        what = self._what(ns)
        try:
            current = await self._core.read_namespaced_config_map(CONFIGMAP_NAME, ns)
        except ApiException as e:
            if e.status != 404:
                raise
            current = None
        if current is None:
            try:
                await self._core.create_namespaced_config_map(ns, self._body(None))
            except ApiException as e:
                if e.status == 409:  # created since we looked: check it again
                    self._enqueue(ns)
                    return
                if e.status in (403, 404) and not await self._namespace_exists(ns):
                    # Deleted, or terminating (a 403 Forbidden on create), meanwhile.
                    self._namespaces.discard(ns)
                    return
                raise
            self.writes["create"] += 1
            log.info("root certificate ConfigMap created", configmap=what)
            return
        if self._is_current(self._api.sanitize_for_serialization(current)):
            return
        body = self._body(current)
        try:
            await self._core.replace_namespaced_config_map(CONFIGMAP_NAME, ns, body)
        except ApiException as e:
            if e.status in (404, 409):  # deleted or changed since we read it
                self._enqueue(ns)
                return
            raise
        self.writes["update"] += 1
        log.info("root certificate ConfigMap updated", configmap=what)

    def _body(self, current: V1ConfigMap | None) -> V1ConfigMap:
        if current is None:
            return V1ConfigMap(
                api_version="v1",
                kind="ConfigMap",
                metadata=V1ObjectMeta(name=CONFIGMAP_NAME, labels=dict(LABELS)),
                data={DATA_KEY: self._root},
            )
        # Keep what others put there (other keys, labels, annotations); set ours.
        current.metadata.labels = {**(current.metadata.labels or {}), **LABELS}
        current.data = {**(current.data or {}), DATA_KEY: self._root}
        return current

    async def _namespace_exists(self, ns: str) -> bool:
        try:
            obj = await self._core.read_namespace(ns)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return obj.status is None or obj.status.phase != "Terminating"

    def _what(self, ns: str) -> str:
        return object_name("ConfigMap", ns, CONFIGMAP_NAME, self._cluster_id)


def _name(obj: dict[str, Any]) -> str:
    name = (obj.get("metadata") or {}).get("name", "")
    return name if isinstance(name, str) else ""


def _live(obj: dict[str, Any]) -> bool:
    # A terminating namespace refuses new objects; Istio skips it too.
    return (obj.get("status") or {}).get("phase") != "Terminating"
