"""Per-stream xDS state: what one connected Envoy watches, was sent and acknowledged.

Everything here runs on the event loop thread; nothing needs a lock. The protocol
decisions (ACK, NACK, stale nonce, subscription changes) live here as pure state
transitions so that the server only generates and sends.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_request import PushRequest
from meshpilot.untrusted import truncate_untrusted
from meshpilot.xds import typeurls, wire
from meshpilot.xds.resources import PushContextLike, Resource

WILDCARD = "*"
# Envoy's NACK messages name the resource and the reason; kept whole up to this length.
MAX_NACK_CHARS = 1024

_MAX_WARNED_TYPES = 16

# Names one stream may subscribe to per type (in one request, and in total). Envoy asks
# for one name per cluster or route config it has, far below this even in big meshes.
# Beyond it the stream is refused (INVALID_ARGUMENT) rather than answered in part: a
# partial answer would leave Envoy waiting for names it never gets, while a refusal is
# visible on both sides. Requests are also capped in bytes by gRPC (server.py).
MAX_NAMES_PER_TYPE = 10_000


class TooManyNames(ValueError):
    """A request would subscribe a stream to more than MAX_NAMES_PER_TYPE names."""

    def __init__(self, type_url: str, count: int) -> None:
        super().__init__(
            f"{typeurls.short(type_url)}: subscription of {count} names, "
            f"expected at most {MAX_NAMES_PER_TYPE} per type"
        )


class Interner:
    """One shared object per distinct subscription, while some stream holds it.

    Proxies of one scope subscribe the same names; caches keyed by the set then match
    by identity, not element by element (an equal-but-distinct 1000-name set costs
    ~100 us per dict lookup). Each set is counted by the streams holding it and dropped
    with the last one, so clients that leave leave nothing behind here.
    """

    # Small sets compare quickly anyway; interning them would cost more than it saves.
    MIN_NAMES = 8

    def __init__(self, max_sets: int = 4096) -> None:
        self._sets: dict[frozenset[str], list[Any]] = {}
        self._max_sets = max_sets

    def __len__(self) -> int:
        return len(self._sets)

    def acquire(self, names: frozenset[str]) -> frozenset[str]:
        """The shared equal set (counted until release()), or `names` itself."""
        if len(names) < self.MIN_NAMES:
            return names
        entry = self._sets.get(names)
        if entry is not None:
            entry[1] += 1
            return entry[0]  # type: ignore[no-any-return]
        if len(self._sets) < self._max_sets:
            # Full: the set is used as it is (correct, only slower to look up).
            self._sets[names] = [names, 1]
        return names

    def release(self, names: frozenset[str]) -> None:
        """One holder of `names` (as returned by acquire) is done with it."""
        if len(names) < self.MIN_NAMES:
            return
        entry = self._sets.get(names)
        if entry is None or entry[0] is not names:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._sets[names]


@dataclass(slots=True)
class WatchedResource:
    """One type URL on one stream (Istio's WatchedResource)."""

    type_url: str
    # Explicitly subscribed names; ignored while `wildcard` is set.
    names: frozenset[str] = frozenset()
    wildcard: bool = False
    nonce_sent: str = ""
    nonce_acked: str = ""
    version_sent: str = ""
    version_acked: str = ""
    # Message of the latest NACK; cleared by the next ACK so syncz shows the current state.
    nack: str = ""
    nack_time: float = 0.0
    nacks: int = 0
    # A response with `nonce_sent` is on the wire and not yet ACKed or NACKed.
    awaiting_ack: bool = False
    # Pushes that arrived while awaiting the ACK, merged; sent when the ACK/NACK comes.
    dirty: PushRequest | None = None
    # SotW EDS after a CDS response: send the next full push even if unchanged, and
    # answer the next ACK-looking request (Envoy re-requests EDS for warming clusters
    # with unchanged names and nonce).
    always_respond: bool = False
    # SotW: the names of the last request, as sent. Envoy repeats every name in each
    # EDS/RDS ACK; comparing with the last list is cheaper than any set operation.
    requested: tuple[str, ...] = ()
    # The same names as they were on the wire, when the request's bytes are known.
    requested_wire: bytes | None = None
    # Delta only: name -> version the client has (sent by us or declared on reconnect).
    # Holds subscribed names only (unless wildcard), so removals computed from it never
    # name a resource the client did not subscribe to.
    versions: dict[str, str] = field(default_factory=dict)
    # What was sent, for debug endpoints: the last full set plus partial updates since.
    # References to shared Resource objects only; never copies.
    sent_base: Sequence[Resource] = ()
    sent_updates: dict[str, Resource] = field(default_factory=dict)

    @property
    def subscription(self) -> frozenset[str] | None:
        """The `names` argument for Generator.generate: None means wildcard."""
        return None if self.wildcard else self.names

    @property
    def idle(self) -> bool:
        """Nothing subscribed, so a push has nothing to generate."""
        return not self.wildcard and not self.names

    def record_sent(self, resources: Sequence[Resource], full: bool) -> None:
        if full:
            self.sent_base = resources
            self.sent_updates = {}
        else:
            for r in resources:
                self.sent_updates[r.name] = r

    def sent_resources(self, delta: bool = False) -> dict[str, Resource]:
        """name -> Resource the client was last sent (still subscribed ones)."""
        out = {r.name: r for r in self.sent_base}
        out.update(self.sent_updates)
        if delta:
            return {n: r for n, r in out.items() if n in self.versions}
        if not self.wildcard:
            return {n: r for n, r in out.items() if n in self.names}
        return out


class Kind(enum.Enum):
    """How a request was classified."""

    INIT = "init"
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"
    # Delta request without a nonce: only subscription changes.
    SUBSCRIPTION = "subscription"


@dataclass(frozen=True, slots=True)
class Reply:
    """The server must answer this request.

    `scope` is the set of names to answer for (None: the whole subscription). A reply
    is sent even when it carries nothing new, because the client is waiting for it.
    """

    scope: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Kind
    reply: Reply | None = None
    # A coalesced push released by this ACK/NACK; send it now.
    dirty: PushRequest | None = None
    added: frozenset[str] = frozenset()
    removed: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class PendingPush:
    """A push waiting for the connection task: requests merged, newest context."""

    request: PushRequest
    context: PushContextLike


Request = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest
Event = Request | PendingPush


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
        region = _names_region(req)
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

    def on_sotw_request(self, req: discovery_pb2.DiscoveryRequest) -> Outcome:
        type_url = req.type_url
        w = self._watched.get(type_url)
        if len(req.resource_names) > MAX_NAMES_PER_TYPE:
            raise TooManyNames(type_url, len(req.resource_names))
        if not req.response_nonce or w is None:
            requested = tuple(req.resource_names)
            names = frozenset(requested)
            # First request for this type, or a reconnect carrying another server's nonce.
            if w is None:
                w = self._watched[type_url] = WatchedResource(type_url)
            w.wildcard = type_url in typeurls.WILDCARD_TYPES and (not names or WILDCARD in names)
            self._set_names(w, frozenset() if w.wildcard else names)
            w.requested = requested
            w.requested_wire = _names_region(req)
            return Outcome(Kind.INIT, Reply())
        if req.response_nonce != w.nonce_sent:
            return Outcome(Kind.STALE)
        kind = self._ack_or_nack(w, req.response_nonce, req.version_info, req)
        added = removed = frozenset[str]()
        region = _names_region(req)
        # Every EDS ACK repeats all names; the common unchanged case is a bytes compare
        # of the names section (or, without raw bytes, one tuple compare).
        if region is None or region != w.requested_wire:
            w.requested_wire = region
            requested = tuple(req.resource_names)
            if requested != w.requested:
                w.requested = requested
                if not w.wildcard:
                    old = w.names
                    names = self._set_names(w, frozenset(requested))
                    added, removed = names - old, old - names
        if added:
            # Only the new names: EDS/RDS responses may be partial in SotW.
            return Outcome(kind, Reply(added), added=added, removed=removed)
        if kind is Kind.ACK and w.always_respond:
            return Outcome(kind, Reply(), removed=removed)
        return Outcome(kind, dirty=self._take_dirty(w), removed=removed)

    def on_delta_request(self, req: discovery_pb2.DeltaDiscoveryRequest) -> Outcome:
        type_url = req.type_url
        w = self._watched.get(type_url)
        count = max(len(req.resource_names_subscribe), len(req.initial_resource_versions))
        if count > MAX_NAMES_PER_TYPE:
            raise TooManyNames(type_url, count)
        sub = frozenset(req.resource_names_subscribe)
        unsub = frozenset(req.resource_names_unsubscribe)
        wildcard_type = type_url in typeurls.WILDCARD_TYPES
        if w is None:
            w = self._watched[type_url] = WatchedResource(type_url)
            w.wildcard = wildcard_type and (not sub or WILDCARD in sub)
            self._set_names(w, sub - {WILDCARD})
            # On reconnect the client tells us what it has: don't resend those versions.
            w.versions = {
                n: v for n, v in req.initial_resource_versions.items() if w.wildcard or n in w.names
            }
            # Explicit names are the reply's scope so that missing ones are reported.
            scope = None if w.wildcard else w.names
            return Outcome(Kind.INIT, Reply(scope), added=w.names)

        kind = Kind.SUBSCRIPTION
        if req.response_nonce:
            if req.response_nonce != w.nonce_sent:
                kind = Kind.STALE
            else:
                kind = self._ack_or_nack(w, req.response_nonce, w.version_sent, req)
        # Subscription changes apply whatever the nonce: unlike SotW they are never
        # repeated, so dropping them with a stale ACK would lose them for good.
        became_wildcard = False
        if WILDCARD in sub and wildcard_type and not w.wildcard:
            w.wildcard = became_wildcard = True
        if WILDCARD in unsub and w.wildcard:
            w.wildcard = False
        explicit = sub - {WILDCARD}
        removed = (unsub - {WILDCARD}) & w.names
        added = explicit - w.names
        if added or unsub:
            names = (w.names | explicit) - unsub
            if len(names) > MAX_NAMES_PER_TYPE:
                raise TooManyNames(type_url, len(names))
            # Only on a real change: an ACK (no names) keeps the interned set, so caches
            # keyed by it still match by identity.
            self._set_names(w, names)
        if not w.wildcard:
            if unsub:
                # The client dropped what it no longer watches; forget its versions so
                # a later re-subscribe is answered, and never name them in removals.
                # (Versions only ever hold subscribed names, so without an unsubscribe
                # there is nothing to drop: an ACK does not scan them.)
                for n in [n for n in w.versions if n not in w.names]:
                    del w.versions[n]
            # An explicit subscribe is a request for the resource even if we think
            # the client has it (Envoy re-subscribes for warming clusters).
            for n in explicit:
                w.versions.pop(n, None)
        if became_wildcard:
            return Outcome(kind, Reply(), added=added, removed=removed)
        if explicit and not w.wildcard:
            return Outcome(kind, Reply(explicit), added=added, removed=removed)
        dirty = self._take_dirty(w) if kind in (Kind.ACK, Kind.NACK) else None
        return Outcome(kind, dirty=dirty, added=added, removed=removed)

    def _set_names(self, w: WatchedResource, names: frozenset[str]) -> frozenset[str]:
        """Replace `w.names`, holding the shared (interned) set for as long as it is used."""
        names = self._interner.acquire(names)
        self._interner.release(w.names)
        w.names = names
        return names

    def release(self) -> None:
        """The stream is over: let go of shared state (interned subscriptions)."""
        for w in self._watched.values():
            self._interner.release(w.names)
            w.names = frozenset()

    def _ack_or_nack(self, w: WatchedResource, nonce: str, version: str, req: Request) -> Kind:
        w.awaiting_ack = False
        if req.HasField("error_detail"):
            w.nack = truncate_untrusted(
                req.error_detail.message or f"code {req.error_detail.code}", MAX_NACK_CHARS
            )
            w.nack_time = time.time()
            w.nacks += 1
            return Kind.NACK
        w.nonce_acked = nonce
        w.version_acked = version
        w.nack = ""
        return Kind.ACK

    @staticmethod
    def _take_dirty(w: WatchedResource) -> PushRequest | None:
        dirty, w.dirty = w.dirty, None
        return dirty


def _names_region(req: Any) -> bytes | None:
    """The serialized resource_names of a SotW request, or None if not found cheaply.

    Serializers write fields in number order: version_info (1), node (2), the names
    (3), type_url (4), response_nonce (5), error_detail (6). For a request without node
    and error_detail, the names are what lies between field 1 and fields 4 and 5.
    Equal regions mean equal name lists.
    """
    raw = getattr(req, "raw", None)
    if raw is None or req.HasField("node") or req.HasField("error_detail"):
        return None
    head = wire.field(1, req.version_info.encode()) if req.version_info else b""
    tail = wire.field(4, req.type_url.encode())
    if req.response_nonce:
        tail += wire.field(5, req.response_nonce.encode())
    if not raw.startswith(head) or not raw.endswith(tail):
        return None
    return raw[len(head) : len(raw) - len(tail)]
