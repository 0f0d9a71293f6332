"""An informer: a local cache of one Kubernetes resource kept current by list and watch.

Istio builds on client-go's shared informers, whose reflector lists a resource, then
watches from the list's resourceVersion, relists when the server answers 410 Gone (the
version was compacted away), and retries failures with backoff. This informer keeps
those semantics on top of kubernetes_asyncio's ApiClient, with these choices:

- The list is paginated (`limit`/`continue`) and read from etcd (resourceVersion
  unset), so a large cluster is never one giant response. A continue token that
  expires mid-list restarts the list after a backoff.
- The watch asks for bookmarks, so a quiet resource still moves its resume version
  forward and a reconnect seldom needs a relist. A watch that ends (server timeout, a
  cut connection) resumes from the last version seen, without listing again.
- A relist is compared with the cache: handlers hear ADDED, MODIFIED and DELETED only for
  what really changed meanwhile (client-go's Replace reaches the same result through
  its DeltaFIFO), never a delete-then-add of everything.
- Bounds: at most `max_objects` objects and `max_object_bytes` per object (its JSON
  size). Beyond them an object is refused: it does not enter the cache (a refused
  update keeps the last good version), the refusal is logged once, kept in `status()`
  and `last_error`, and the informer goes on serving everything else.
- Handlers run synchronously, in order, after the cache changed; one that raises is
  logged and does not stop the informer or the other handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

from meshpilot.discovery.kube.resource import (
    EventType,
    Handler,
    InformerEvent,
    ObjectKey,
    Resource,
)
from meshpilot.discovery.kube.stream import Oversized, lines
from meshpilot.kube.backoff import Backoff
from meshpilot.monitoring import metrics

log = structlog.get_logger(__name__)

MAX_OBJECTS = 200_000
# etcd's default request limit: no stored object can be larger.
MAX_OBJECT_BYTES = 1536 * 1024
PAGE_SIZE = 500
# A watch event line this many times the object cap is skipped unread, so a broken or
# hostile server cannot make the informer buffer without end.
_LINE_CAP_FACTOR = 4
# A watch that ends this soon having delivered nothing is retried at once the first
# time and after a backoff from then on, so a server that closes every watch at once is
# not hammered.
_QUIET_WATCH = 1.0
_AUTH = ["BearerToken"]
_STATUS_REFUSED = 20
# The size given to a listed object known to be over the object cap.
_OVER_CAP = -1
# Objects handled between two yields to the event loop during a relist.
_CHUNK = 500


# How long stop() waits for a cancelled watch to unwind.
STOP_TIMEOUT = 5.0


class Gone(Exception):
    """410: the resourceVersion asked for is older than the server's history."""


class Informer:
    """List-then-watch one resource into a cache; `start()`, await `synced`, `stop()`."""

    def __init__(
        self,
        api_client: ApiClient,
        resource: Resource,
        *,
        namespace: str | None = None,
        label_selector: str = "",
        field_selector: str = "",
        page_size: int = PAGE_SIZE,
        max_objects: int = MAX_OBJECTS,
        max_object_bytes: int = MAX_OBJECT_BYTES,
        request_timeout: float = 60.0,
        watch_timeout: tuple[int, int] = (300, 600),
        backoff: Backoff | None = None,
    ) -> None:
        if page_size < 1 or max_objects < 1 or max_object_bytes < 1:
            raise ValueError("informer: page_size, max_objects and max_object_bytes must be > 0")
        self._api = api_client
        self.resource = resource
        self._namespace = namespace
        self._label_selector = label_selector
        self._field_selector = field_selector
        self._page_size = page_size
        self._max_objects = max_objects
        self._max_object_bytes = max_object_bytes
        self._request_timeout = request_timeout
        self._watch_timeout = watch_timeout
        self._backoff = backoff or Backoff()
        self._handlers: list[Handler] = []
        self._cache: dict[ObjectKey, Mapping[str, Any]] = {}
        self.refused: dict[ObjectKey, str] = {}
        self.synced = asyncio.Event()
        self.resource_version = ""
        self.connected = False
        self.last_error = ""
        self.last_error_time = 0.0
        self.reconnects = 0
        self.lists = 0
        self._task: asyncio.Task[None] | None = None
        self._rng = random.Random()
        self._gauge = metrics.KUBE_INFORMER_CONNECTED.labels(resource.label)
        self._gauge.set(0)

    # --- public -------------------------------------------------------------------------

    def add_handler(self, handler: Handler) -> None:
        self._handlers.append(handler)

    def get(self, key: ObjectKey) -> Mapping[str, Any] | None:
        return self._cache.get(key)

    def items(self) -> dict[ObjectKey, Mapping[str, Any]]:
        """A copy of the cache."""
        return dict(self._cache)

    def __len__(self) -> int:
        return len(self._cache)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name=f"informer {self.resource.label}")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # Bounded: a read stuck inside the HTTP client must not hold up shutdown.
            await asyncio.wait([task], timeout=STOP_TIMEOUT)
        self._set_connected(False)

    def status(self) -> dict[str, Any]:
        """For /debug/configz: where the informer is and what went wrong last."""
        return {
            "resource": self.resource.label,
            "namespace": self._namespace or "",
            "synced": self.synced.is_set(),
            "connected": self.connected,
            "resourceVersion": self.resource_version,
            "objects": len(self._cache),
            "lists": self.lists,
            "reconnects": self.reconnects,
            "lastError": self.last_error,
            "lastErrorTime": self.last_error_time,
            "refusedCount": len(self.refused),
            # The first few: enough to act on, without a page per refused object.
            "refused": {
                f"{ns}/{n}" if ns else n: why
                for (ns, n), why in itertools.islice(self.refused.items(), _STATUS_REFUSED)
            },
        }

    async def run(self) -> None:
        """List and watch until cancelled."""
        need_list = True
        quiet_closes = 0
        while True:
            try:
                if need_list:
                    await self._list()
                    need_list = False
                if await self._watch():
                    quiet_closes = 0
                    continue
                # Closed cleanly at once, without a single event: normal once (a server
                # shutting down, a cut connection), but never in a tight loop.
                quiet_closes += 1
                if quiet_closes == 1:
                    continue
                log.debug("watch closed at once again", resource=self.resource.label)
            except Gone as e:
                # The normal way back after a long disconnection: relist at once.
                log.info(
                    "resourceVersion expired, relisting", resource=self.resource.label, error=str(e)
                )
                need_list = True
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure is retried
                self._failed(_describe(e))
            await asyncio.sleep(self._backoff.next())

    # --- list -----------------------------------------------------------------------------

    async def _list(self) -> None:
        listed: list[tuple[Mapping[str, Any], int]] = []
        # Items that can enter the cache: once there are max_objects of them, any new
        # key is bound to be refused, so only its name is kept (memory stays bounded).
        candidates = 0
        cont = ""
        rv = ""
        while True:
            query: dict[str, Any] = {"limit": self._page_size, **self._selectors()}
            if cont:
                query["continue"] = cont
            try:
                body = await self._get(query)
            except Gone as e:
                # The list's snapshot was compacted between pages: start over, after a pause.
                raise RuntimeError(f"list expired between pages: {e}") from None
            items = body.get("items") or []
            if not isinstance(items, list):
                raise ValueError("list response: items is not a list")
            for item in items:
                if not isinstance(item, dict):
                    continue
                # Items of a list of built-ins carry no kind or apiVersion.
                item.setdefault("kind", self.resource.kind)
                item.setdefault("apiVersion", self.resource.api_version)
                size = len(json.dumps(item, separators=(",", ":")))
                if size > self._max_object_bytes:
                    listed.append((_stub(item), size))
                elif candidates >= self._max_objects and _key(item) not in self._cache:
                    listed.append((_stub(item), _OVER_CAP))
                else:
                    candidates += 1
                    listed.append((item, size))
            meta = body.get("metadata") or {}
            rv = str(meta.get("resourceVersion") or "")
            cont = str(meta.get("continue") or "")
            if not cont:
                break
        self.lists += 1
        await self._replace(listed)
        self.resource_version = rv
        self._set_connected(True)
        self._backoff.reset()
        if not self.synced.is_set():
            log.info("informer synced", resource=self.resource.label, objects=len(self._cache))
            self.synced.set()

    async def _get(self, query: dict[str, Any]) -> dict[str, Any]:
        try:
            body = await self._api.call_api(
                self.resource.collection_path(self._namespace),
                "GET",
                query_params=query,
                response_types_map={200: "object"},
                auth_settings=_AUTH,
                _return_http_data_only=True,
                _request_timeout=self._request_timeout,
            )
        except ApiException as e:
            if e.status == 410:
                raise Gone(_status_message(e.body)) from None
            raise
        if not isinstance(body, dict):
            raise ValueError(f"list response: expected an object, got {type(body).__name__}")
        return body

    def _selectors(self) -> dict[str, str]:
        out = {}
        if self._label_selector:
            out["labelSelector"] = self._label_selector
        if self._field_selector:
            out["fieldSelector"] = self._field_selector
        return out

    async def _replace(self, listed: list[tuple[Mapping[str, Any], int]]) -> None:
        """Bring the cache in line with a complete list, announcing only the differences.

        Deletions go first, so that objects gone meanwhile free their room under the
        object cap for the new ones."""
        present = {_key(obj) for obj, _ in listed}
        for key in [k for k in self.refused if k not in present]:
            del self.refused[key]
        changes = [(EventType.DELETED, self._cache[k], 0) for k in self._cache if k not in present]
        changes += [(EventType.MODIFIED, obj, size) for obj, size in listed]
        for step, (kind, obj, size) in enumerate(changes, start=1):
            self._apply(kind, obj, size)
            if step % _CHUNK == 0:
                # A large relist: let /ready, xDS and pushes run between chunks.
                await asyncio.sleep(0)

    # --- watch ----------------------------------------------------------------------------

    async def _watch(self) -> bool:
        """Watch from `resource_version` until the stream ends. False when it ended at
        once without delivering anything (worth a backoff)."""
        timeout = self._rng.randint(*self._watch_timeout)
        query: dict[str, Any] = {
            "watch": "true",
            "resourceVersion": self.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": timeout,
            **self._selectors(),
        }
        started = time.monotonic()
        # The wait for the response head is bounded like any request; the stream
        # itself by the server-side timeout plus a margin.
        resp = await asyncio.wait_for(
            self._api.call_api(
                self.resource.collection_path(self._namespace),
                "GET",
                query_params=query,
                auth_settings=_AUTH,
                _preload_content=False,
                _request_timeout=aiohttp.ClientTimeout(total=timeout + 30),
            ),
            self._request_timeout,
        )
        delivered = False
        try:
            if resp.status != 200:
                text = (await resp.content.read(64 * 1024)).decode(errors="replace")
                if resp.status == 410:
                    raise Gone(_status_message(text))
                raise ApiException(status=resp.status, reason=_status_message(text))
            self._set_connected(True)
            self._backoff.reset()
            line_cap = self._max_object_bytes * _LINE_CAP_FACTOR + 64 * 1024
            async for line in lines(resp.content, line_cap):
                if isinstance(line, Oversized):
                    self._oversized(line)
                else:
                    self._event(line)
                delivered = True
        finally:
            resp.release()
        return delivered or time.monotonic() - started >= _QUIET_WATCH

    def _event(self, line: bytes) -> None:
        try:
            event = json.loads(line)
            kind, obj = event["type"], event["object"]
            if not isinstance(obj, dict):
                raise TypeError("object is not a mapping")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"malformed watch event: {e}") from None
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone(str(obj.get("message", "")))
            raise RuntimeError(f"watch error {obj.get('code')}: {obj.get('message', '')}")
        rv = str((obj.get("metadata") or {}).get("resourceVersion") or "")
        if kind == "BOOKMARK":
            # Nothing changed for this informer up to rv: resume from there.
            if rv:
                self.resource_version = rv
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            raise ValueError(f"malformed watch event: unknown type {kind!r}")
        self._apply(EventType(kind), obj, len(line))
        if rv:
            self.resource_version = rv

    # --- cache ----------------------------------------------------------------------------

    def _apply(self, kind: EventType, obj: Mapping[str, Any], size: int) -> None:
        """Change the cache and tell the handlers. For a relist, ADDED/MODIFIED is decided
        here from the cache, and an object whose resourceVersion is unchanged is skipped."""
        key = _key(obj)
        old = self._cache.get(key)
        if kind is EventType.DELETED:
            self.refused.pop(key, None)
            if old is not None:
                del self._cache[key]
                self._notify(InformerEvent(EventType.DELETED, key, obj if size else old, old))
            return
        if size > self._max_object_bytes:
            self._refuse(key, f"object of {size} bytes is over the {self._max_object_bytes} limit")
            return
        if size == _OVER_CAP or (old is None and len(self._cache) >= self._max_objects):
            self._refuse(key, f"over the limit of {self._max_objects} objects")
            return
        self.refused.pop(key, None)
        if old is not None and _rv(old) == _rv(obj) and _rv(obj):
            return
        self._cache[key] = obj
        event_type = EventType.ADDED if old is None else EventType.MODIFIED
        self._notify(InformerEvent(event_type, key, obj, old))

    def _oversized(self, line: Oversized) -> None:
        """A watch event too large to read: refuse its object by name if the start of the
        line names it. A deletion is still applied: the object is gone either way."""
        ident = line.identify()
        if ident is None or ident[0] not in ("ADDED", "MODIFIED", "DELETED"):
            self._error(f"watch event of over {line.size} bytes skipped, object unknown")
            return
        kind, ns, name = ident
        if kind == "DELETED":
            old = self._cache.get((ns, name))
            self._apply(EventType.DELETED, old or {"metadata": {"namespace": ns, "name": name}}, 0)
            return
        self._apply(EventType(kind), {"metadata": {"namespace": ns, "name": name}}, line.size)

    def _refuse(self, key: ObjectKey, why: str) -> None:
        if self.refused.get(key) != why:
            self.refused[key] = why
            ref = f"{key[0]}/{key[1]}" if key[0] else key[1]
            self._error(f"{self.resource.kind} {ref} refused: {why}; the last good version is kept")

    def _notify(self, event: InformerEvent) -> None:
        for handler in self._handlers:
            try:
                handler(event)
            except Exception:
                log.exception(
                    "informer handler failed", resource=self.resource.label, key=event.key
                )

    # --- state ----------------------------------------------------------------------------

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            log.info(
                "kubernetes informer connected"
                if connected
                else "kubernetes informer disconnected",
                resource=self.resource.label,
            )
        self._gauge.set(1 if connected else 0)

    def _error(self, message: str) -> None:
        self.last_error = message
        self.last_error_time = time.time()
        log.error("kubernetes informer", resource=self.resource.label, error=message)

    def _failed(self, message: str) -> None:
        self.reconnects += 1
        metrics.KUBE_INFORMER_RECONNECTS.labels(self.resource.label).inc()
        # A long outage repeats the same error every 30 s per informer: a warning when
        # it starts or changes, the repeats at debug level.
        news = self.connected or message != self.last_error
        self._set_connected(False)
        self.last_error = message
        self.last_error_time = time.time()
        (log.warning if news else log.debug)(
            "kubernetes list/watch failed, retrying", resource=self.resource.label, error=message
        )


def _key(obj: Mapping[str, Any]) -> ObjectKey:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def _stub(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Just the identity of an object that will be refused."""
    ns, name = _key(obj)
    return {"metadata": {"namespace": ns, "name": name}}


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _status_message(body: Any) -> str:
    """The message of a v1 Status body, or the start of whatever came instead."""
    text = body.decode(errors="replace") if isinstance(body, bytes) else str(body or "")
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(text).get("message")
        if isinstance(message, str):
            return message[:500]
    return text[:500]


def _describe(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"HTTP {e.status}: {_status_message(e.body) or e.reason}"
    if isinstance(e, TimeoutError):
        return "request timed out"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
