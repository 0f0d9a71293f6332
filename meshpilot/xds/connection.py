"""One ADS stream: its proxy, what it watches per type, and its queue of events.

Everything here runs on the event loop thread; nothing needs a lock. Client requests
and pushes are queued for the stream's one task; the protocol decisions (ACK, NACK,
stale nonce, subscription changes) are WatchedResource's (meshpilot/xds/watched.py),
as pure state transitions, so that the server only generates and sends.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_request import PushRequest
from meshpilot.xds import wire
from meshpilot.xds.protocol import Kind, Request
from meshpilot.xds.resources import PushContextLike, Resource
from meshpilot.xds.watched import (
    MAX_NAMES_PER_TYPE,
    WILDCARD,
    Interner,
    Outcome,
    Reply,
    TooManyNames,
    WatchedResource,
    names_region,
)

# Re-exported: the server and tests take the per-stream vocabulary from here.
__all__ = [
    "MAX_NAMES_PER_TYPE",
    "WILDCARD",
    "Connection",
    "Interner",
    "Kind",
    "Outcome",
    "PendingPush",
    "Reply",
    "TooManyNames",
    "WatchedResource",
]

_MAX_WARNED_TYPES = 16


@dataclass(frozen=True, slots=True)
class PendingPush:
    """A push waiting for the connection task: requests merged, newest context."""

    request: PushRequest
    context: PushContextLike


Event: TypeAlias = Request | PendingPush


class Connection:
    """One ADS stream (SotW or Delta) from one proxy."""

    def __init__(
        self,
        conn_id: str,
        proxy: Proxy,
        *,
        delta: bool,
        peer: str = "",
        max_queued_requests: int = 64,
        interner: Interner | None = None,
    ) -> None:
        self.conn_id = conn_id
        self.proxy = proxy
        self.delta = delta
        self.peer = peer
        self.connected_at = time.time()
        self._watched: dict[str, WatchedResource] = {}
        # Shared by the server's connections; a private one for a lone connection.
        self._interner = interner if interner is not None else Interner()
        # Unknown type URLs already warned about (bounded: a client can send any number).
        self._warned_types: set[str] = set()
        # Earliest PushRequest.start not yet fully ACKed, for the convergence metric.
        self.converge_start: float | None = None
        self._requests: deque[Request] = deque()
        self._max_requests = max_queued_requests
        self._push: PendingPush | None = None
        self._closed = False
        # The client sent bytes that do not decode; set by the reader before closing.
        self.undecodable: wire.Undecodable | None = None
        # The connection task is parked in next_event() with nothing to do.
        self._parked = False
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    @property
    def watched(self) -> Mapping[str, WatchedResource]:
        return self._watched

    def warn_unknown_type(self, type_url: str) -> bool:
        """True the first time an unknown `type_url` is seen (for the first few only)."""
        if type_url in self._warned_types or len(self._warned_types) >= _MAX_WARNED_TYPES:
            return False
        self._warned_types.add(type_url)
        return True

    def sent_resources(self, type_url: str) -> dict[str, Resource]:
        """What this proxy was last sent of `type_url` (empty if not watched)."""
        w = self._watched.get(type_url)
        return w.sent_resources(self.delta) if w else {}

    # Event queue: client requests and pushes, consumed by one connection task.

    async def put_request(self, request: Request) -> None:
        """Called by the stream reader; waits when the connection task falls behind."""
        while len(self._requests) >= self._max_requests:
            self._room.clear()
            await self._room.wait()
        self._requests.append(request)
        self._wake.set()

    def enqueue_push(self, request: PushRequest, context: PushContextLike) -> None:
        """Merge into the pending push: a slow proxy gets one push, not a backlog."""
        pending = self._push
        merged = request if pending is None else pending.request.merge(request)
        self._push = PendingPush(merged, context)
        self._wake.set()

    def close_input(self) -> None:
        self._closed = True
        self._wake.set()

    @property
    def idle(self) -> bool:
        """The connection task waits for work and has none queued or running.

        Only then may a request be handled outside that task (see
        DiscoveryServer._read): nothing it would do can come before or after it.
        """
        return self._parked and not self._requests and self._push is None and not self._closed

    def is_plain_ack(self, req: Request) -> bool:
        """True if `req` is an ACK that changes nothing but the ACK state.

        Such a request needs no answer and releases no coalesced push: handling it
        is a pure state transition (on_sotw_request / on_delta_request) with no write.
        Cheap checks only; anything unusual returns False and goes the normal way.
        """
        w = self._watched.get(req.type_url)
        nonce = req.response_nonce
        if w is None or not nonce or nonce != w.nonce_sent or not w.awaiting_ack:
            return False
        if w.dirty is not None or req.HasField("error_detail"):
            return False
        if self.delta:
            return not req.resource_names_subscribe and not req.resource_names_unsubscribe
        if w.always_respond:
            return False
        region = names_region(req)
        return region is not None and region == w.requested_wire

    @property
    def has_pending_push(self) -> bool:
        return self._push is not None

    async def next_event(self) -> Event | None:
        """Next client request (first, they may free ACK slots), else push; None at EOF."""
        while True:
            if self._requests:
                req = self._requests.popleft()
                self._room.set()
                return req
            if self._push is not None:
                push, self._push = self._push, None
                return push
            if self._closed:
                return None
            self._wake.clear()
            self._parked = True
            try:
                await self._wake.wait()
            finally:
                self._parked = False

    # Convergence bookkeeping.

    def note_push_started(self, start: float) -> None:
        if self.converge_start is None or start < self.converge_start:
            self.converge_start = start

    def take_converged(self) -> float | None:
        """The push start time if everything pushed is now ACKed (or NACKed), else None."""
        if self.converge_start is None or self._push is not None:
            return None
        for w in self._watched.values():
            if w.awaiting_ack or w.dirty is not None:
                return None
        start, self.converge_start = self.converge_start, None
        return start

    # Protocol state transitions.

    def on_sotw_request(self, req: Any) -> Outcome:
        w = self._watched.get(req.type_url)
        new = w is None
        if w is None:
            w = WatchedResource(req.type_url)
        outcome = w.on_sotw_request(req, self._interner, new=new)
        if new:
            self._watched[req.type_url] = w
        return outcome

    def on_delta_request(self, req: Any) -> Outcome:
        w = self._watched.get(req.type_url)
        new = w is None
        if w is None:
            w = WatchedResource(req.type_url)
        outcome = w.on_delta_request(req, self._interner, new=new)
        if new:
            self._watched[req.type_url] = w
        return outcome

    def release(self) -> None:
        """The stream is over: let go of shared state (interned subscriptions)."""
        for w in self._watched.values():
            w.release(self._interner)
