"""An etcd-like multi-version store with one global revision, an event log and watchers.

Like etcd behind kube-apiserver: every write takes the next revision of one counter shared by
all resources; each key keeps its older revisions until compaction, so a list can be served at
an exact past revision (this is what makes `continue` tokens consistent); the event log keeps
every change after the compaction horizon so a watch can resume from any retained revision,
and anything older is "too old" (410 Expired).
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]
GroupResource = tuple[str, str]
ObjKey = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped

# A watcher that falls this many events behind is closed, as the real watch cache does with
# a watcher whose buffer is full; the client must re-list or resume.
WATCHER_BUFFER = 10_000
# History kept before the store compacts on its own (the real server compacts every 5 minutes).
DEFAULT_MAX_EVENTS = 50_000


class Expired(Exception):
    """A revision older than the compaction horizon was asked for."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {requested} ({oldest})")
        self.requested = requested
        self.oldest = oldest


def sort_key(key: ObjKey) -> str:
    # etcd orders keys bytewise as "<namespace>/<name>"; lists come back in that order.
    namespace, name = key
    return f"{namespace}/{name}" if namespace else name


@dataclass(frozen=True)
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    gr: GroupResource
    key: ObjKey
    obj: Obj  # for DELETED: the last state, its resourceVersion set to the deletion revision
    prev: Obj | None


@dataclass(eq=False)
class Watcher:
    gr: GroupResource
    accept: Callable[[Event], Event | None]
    pending: deque[Event] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    closed: str | None = None  # why the server ended this watch
    abort: bool = False
    bookmark_requested: bool = False

    def push(self, event: Event) -> None:
        if self.closed:
            return
        out = self.accept(event)
        if out is None:
            return
        if len(self.pending) >= WATCHER_BUFFER:
            self.close("watcher buffer full")
            return
        self.pending.append(out)
        self.wakeup.set()

    def close(self, reason: str, abort: bool = False) -> None:
        self.closed = reason
        self.abort = abort
        self.wakeup.set()


class Store:
    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS) -> None:
        self.rv = 1
        self.compacted = 1  # revisions <= this are no longer individually retrievable
        self.max_events = max_events
        self._current: dict[GroupResource, dict[ObjKey, Obj]] = {}
        self._history: dict[GroupResource, dict[ObjKey, list[tuple[int, Obj | None]]]] = {}
        self._events: deque[Event] = deque()
        self.watchers: set[Watcher] = set()
        self._rv_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._watch_waiters: list[tuple[int, asyncio.Future[None]]] = []

    # -- reads --

    def get(self, gr: GroupResource, key: ObjKey) -> Obj | None:
        return self._current.get(gr, {}).get(key)

    def items(self, gr: GroupResource) -> dict[ObjKey, Obj]:
        return self._current.get(gr, {})

    def snapshot(self, gr: GroupResource, rv: int) -> list[tuple[ObjKey, Obj]]:
        """The objects of `gr` as they were at revision `rv`, in key order."""
        if rv < self.compacted:
            raise Expired(rv, self.compacted)
        if rv >= self.rv:
            found = list(self._current.get(gr, {}).items())
        else:
            found = []
            for key, revisions in self._history.get(gr, {}).items():
                state = None
                for rev, obj in revisions:
                    if rev > rv:
                        break
                    state = obj
                if state is not None:
                    found.append((key, state))
        found.sort(key=lambda kv: sort_key(kv[0]))
        return found

    def events_since(self, gr: GroupResource, rv: int) -> list[Event]:
        if rv < self.compacted:
            raise Expired(rv, self.compacted)
        return [e for e in self._events if e.rv > rv and e.gr == gr]

    async def wait_for_rv(self, rv: int, timeout: float) -> bool:  # noqa: ASYNC109
        if self.rv >= rv:
            return True
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._rv_waiters.append((rv, waiter))
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout)
        except TimeoutError:
            return False
        finally:
            self._rv_waiters = [(r, w) for r, w in self._rv_waiters if w is not waiter]
        return True

    # -- writes --

    def put(self, gr: GroupResource, key: ObjKey, obj: Obj) -> tuple[Obj, str]:
        """Store `obj` at the next revision; returns the stored object and the event type."""
        prev = self.get(gr, key)
        self.rv += 1
        stored = copy.deepcopy(obj)
        stored.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        self._current.setdefault(gr, {})[key] = stored
        self._history.setdefault(gr, {}).setdefault(key, []).append((self.rv, stored))
        kind = "ADDED" if prev is None else "MODIFIED"
        self._emit(Event(self.rv, kind, gr, key, stored, prev))
        return stored, kind

    def delete(self, gr: GroupResource, key: ObjKey) -> Obj | None:
        prev = self._current.get(gr, {}).pop(key, None)
        if prev is None:
            return None
        self.rv += 1
        tomb = copy.deepcopy(prev)
        tomb["metadata"]["resourceVersion"] = str(self.rv)
        self._history[gr][key].append((self.rv, None))
        self._emit(Event(self.rv, "DELETED", gr, key, tomb, prev))
        return tomb

    def _emit(self, event: Event) -> None:
        self._events.append(event)
        if len(self._events) > self.max_events:
            self.compact(self._events[len(self._events) - self.max_events].rv - 1)
        for watcher in list(self.watchers):
            if watcher.gr == event.gr:
                watcher.push(event)
        for target, waiter in self._rv_waiters:
            if target <= self.rv and not waiter.done():
                waiter.set_result(None)

    def compact(self, rv: int | None = None) -> int:
        """Forget history up to `rv` (default: now), as etcd compaction does."""
        target = self.rv if rv is None else min(rv, self.rv)
        if target <= self.compacted:
            return self.compacted
        self.compacted = target
        while self._events and self._events[0].rv <= target:
            self._events.popleft()
        for per_key in self._history.values():
            for key in list(per_key):
                revisions = per_key[key]
                keep_from = 0
                for i, (rev, _) in enumerate(revisions):
                    if rev <= target:
                        keep_from = i
                kept = revisions[keep_from:]
                if len(kept) == 1 and kept[0][1] is None:
                    del per_key[key]
                else:
                    per_key[key] = kept
        return self.compacted

    # -- watchers --

    def add_watcher(self, watcher: Watcher, replay: Iterable[Event]) -> None:
        # Called without awaiting between reading history and registering, so no event is
        # lost or duplicated between the two.
        for event in replay:
            watcher.push(event)
        self.watchers.add(watcher)
        for count, waiter in self._watch_waiters:
            if len(self.watchers) >= count and not waiter.done():
                waiter.set_result(None)

    async def wait_for_watchers(self, count: int, timeout: float) -> None:  # noqa: ASYNC109
        """Until `count` watches are open (TimeoutError after `timeout` seconds)."""
        if len(self.watchers) >= count:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watch_waiters.append((count, waiter))
        try:
            await asyncio.wait_for(waiter, timeout)
        finally:
            self._watch_waiters = [(c, w) for c, w in self._watch_waiters if w is not waiter]

    def remove_watcher(self, watcher: Watcher) -> None:
        self.watchers.discard(watcher)

    def close_watchers(self, reason: str, abort: bool = False) -> int:
        count = 0
        for watcher in list(self.watchers):
            watcher.close(reason, abort)
            count += 1
        return count
