"""The watch verb: a chunked HTTP response of newline-delimited JSON events.

As kube-apiserver's watch cache does: a watch without resourceVersion (or with "0") first
sends the current state as ADDED events; one with resourceVersion N sends every change after
N, or, when N is older than the compaction horizon, an ERROR event whose object is a 410
Expired Status, then ends. Selectors apply to the object before and after each change, so an
object that leaves the selection arrives as DELETED (its previous state at the event's
revision) and one that enters it as ADDED. BOOKMARK events carry only kind, apiVersion and
metadata.resourceVersion.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tests.kube.objects import invalid_list_options, status_body
from tests.kube.resources import ResourceType
from tests.kube.rest import parse_bool, parse_int, parse_rv, render, selection
from tests.kube.store import Event, Expired, Watcher

if TYPE_CHECKING:
    from tests.kube.apiserver import ApiServer

INITIAL_EVENTS_END = "k8s.io/initial-events-end"


def _line(event_type: str, obj: dict[str, Any]) -> bytes:
    return (json.dumps({"type": event_type, "object": obj}) + "\n").encode()


async def serve_watch(
    server: ApiServer, request: web.Request, rt: ResourceType, version: str, namespace: str
) -> web.StreamResponse:
    query = request.query
    sel = selection(rt, namespace, query)
    bookmarks = parse_bool(query, "allowWatchBookmarks")
    initial = parse_bool(query, "sendInitialEvents")
    timeout = parse_int(query, "timeoutSeconds")
    rv_param = query.get("resourceVersion", "")
    start_rv = parse_rv(rv_param) if rv_param else 0
    match = query.get("resourceVersionMatch", "")
    if "sendInitialEvents" in query:
        if match != "NotOlderThan":
            raise invalid_list_options(
                "resourceVersionMatch",
                "Forbidden: sendInitialEvents requires setting resourceVersionMatch=NotOlderThan",
            )
        if not bookmarks:
            raise invalid_list_options(
                "allowWatchBookmarks",
                "Required value: sendInitialEvents requires setting allowWatchBookmarks=true",
            )
    elif match:
        raise invalid_list_options(
            "resourceVersionMatch",
            "Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents "
            "is provided",
        )
    store = server.store

    def accept(event: Event) -> Event | None:
        cur = event.type != "DELETED" and sel.matches(event.key, event.obj)
        old = event.prev is not None and sel.matches(event.key, event.prev)
        if cur and old:
            return event
        if cur:
            return Event(event.rv, "ADDED", event.gr, event.key, event.obj, None)
        if old:
            if event.type == "DELETED":
                return event
            assert event.prev is not None
            gone = json.loads(json.dumps(event.prev))
            gone["metadata"]["resourceVersion"] = str(event.rv)
            return Event(event.rv, "DELETED", event.gr, event.key, gone, event.prev)
        return None

    watcher = Watcher(rt.group_resource, accept)
    too_old: Expired | None = None
    send_end_bookmark = False
    snapshot_rv = store.rv
    replay: list[Event] = []
    if initial or ("sendInitialEvents" not in query and rv_param in ("", "0")):
        replay = [
            Event(int(o["metadata"]["resourceVersion"]), "ADDED", rt.group_resource, k, o, None)
            for k, o in store.snapshot(rt.group_resource, snapshot_rv)
        ]
        send_end_bookmark = initial
    elif rv_param not in ("", "0"):
        try:
            replay = store.events_since(rt.group_resource, start_rv)
        except Expired as exc:
            too_old = exc

    response = web.StreamResponse(status=200)
    response.content_type = "application/json"
    response.enable_chunked_encoding()
    if too_old is not None:
        await response.prepare(request)
        body = status_body(410, "Expired", str(too_old))
        await response.write(_line("ERROR", body))
        await response.write_eof()
        return response

    store.add_watcher(watcher, replay)
    initial_count = len(watcher.pending) if send_end_bookmark else 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout > 0 else None
    interval = server.bookmark_interval
    next_bookmark = loop.time() + interval

    def bookmark(rv: int, annotations: dict[str, str] | None = None) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if annotations:
            meta["annotations"] = annotations
        return _line(
            "BOOKMARK", {"kind": rt.kind, "apiVersion": rt.api_version(version), "metadata": meta}
        )

    try:
        await response.prepare(request)
        if send_end_bookmark:
            # The initial state, then the bookmark that marks its end at the snapshot's
            # revision; changes made meanwhile follow it.
            for _ in range(initial_count):
                event = watcher.pending.popleft()
                await response.write(_line(event.type, render(rt, version, event.obj)))
            await response.write(bookmark(snapshot_rv, {INITIAL_EVENTS_END: "true"}))
        while True:
            while watcher.pending:
                event = watcher.pending.popleft()
                await response.write(_line(event.type, render(rt, version, event.obj)))
            if watcher.closed:
                if watcher.abort and request.transport is not None:
                    request.transport.abort()
                    return response
                break
            now = loop.time()
            if deadline is not None and now >= deadline:
                break
            if bookmarks and (watcher.bookmark_requested or now >= next_bookmark):
                watcher.bookmark_requested = False
                next_bookmark = now + interval
                # Everything up to the current revision has been written above.
                await response.write(bookmark(store.rv))
                continue
            wait = next_bookmark - now if bookmarks else None
            if deadline is not None:
                wait = min(wait, deadline - now) if wait is not None else deadline - now
            watcher.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(watcher.wakeup.wait(), wait)
        await response.write_eof()
    except ConnectionResetError:
        # The client went away; nothing more to send.
        pass
    finally:
        store.remove_watcher(watcher)
    return response
