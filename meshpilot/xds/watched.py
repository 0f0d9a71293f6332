"""What one stream watches of one type, and the only code that changes it.

Istio's WatchedResource: the subscribed names, the handshake (nonce sent, ACKed,
NACKed; meshpilot/xds/protocol.py), and for Delta the version the client has of each
name. Requests are classified here as pure state transitions (`on_sotw_request`,
`on_delta_request`), and the response builders (sotw.py, delta.py) record what they
sent through `sent_sotw` / `sent_delta`; nothing else writes these fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from meshpilot.model.push_request import PushRequest
from meshpilot.xds import typeurls, wire
from meshpilot.xds.protocol import Handshake, Kind
from meshpilot.xds.resources import Resource

WILDCARD = "*"

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


@dataclass(slots=True)
class WatchedResource(Handshake):
    """One type URL on one stream (Istio's WatchedResource)."""

    type_url: str
    # Explicitly subscribed names; ignored while `wildcard` is set.
    names: frozenset[str] = frozenset()
    wildcard: bool = False
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
    # Delta, wildcard: the full set `versions` is exactly the name -> version map of
    # (what the client was last sent, all of it), or None when unknown. Streams of a
    # scope that were sent the same set share the diff to the next one (delta.py).
    delta_base: Sequence[Resource] | None = None
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

    def sent_resources(self, delta: bool = False) -> dict[str, Resource]:
        """name -> Resource the client was last sent (still subscribed ones)."""
        out = {r.name: r for r in self.sent_base}
        out.update(self.sent_updates)
        if delta:
            return {n: r for n, r in out.items() if n in self.versions}
        if not self.wildcard:
            return {n: r for n, r in out.items() if n in self.names}
        return out

    # --- requests ------------------------------------------------------------------------

    def on_sotw_request(
        self, req: discovery_pb2.DiscoveryRequest, interner: Interner, *, new: bool
    ) -> Outcome:
        """Apply a SotW request; `new` when this type had no state on the stream yet."""
        if len(req.resource_names) > MAX_NAMES_PER_TYPE:
            raise TooManyNames(self.type_url, len(req.resource_names))
        if new or not req.response_nonce:
            # First request for this type, or a reconnect carrying another server's nonce.
            requested = tuple(req.resource_names)
            names = frozenset(requested)
            self.wildcard = self.type_url in typeurls.WILDCARD_TYPES and (
                not names or WILDCARD in names
            )
            self._set_names(frozenset() if self.wildcard else names, interner)
            self.requested = requested
            self.requested_wire = names_region(req)
            return Outcome(Kind.INIT, Reply())
        if not self.answers(req.response_nonce):
            return Outcome(Kind.STALE)
        kind = self.answered(req, req.version_info)
        added = removed = frozenset[str]()
        region = names_region(req)
        # Every EDS ACK repeats all names; the common unchanged case is a bytes compare
        # of the names section (or, without raw bytes, one tuple compare).
        if region is None or region != self.requested_wire:
            self.requested_wire = region
            requested = tuple(req.resource_names)
            if requested != self.requested:
                self.requested = requested
                if not self.wildcard:
                    old = self.names
                    names = self._set_names(frozenset(requested), interner)
                    added, removed = names - old, old - names
        if added:
            # Only the new names: EDS/RDS responses may be partial in SotW.
            return Outcome(kind, Reply(added), added=added, removed=removed)
        if kind is Kind.ACK and self.always_respond:
            return Outcome(kind, Reply(), removed=removed)
        return Outcome(kind, dirty=self.take_dirty(), removed=removed)

    def on_delta_request(
        self, req: discovery_pb2.DeltaDiscoveryRequest, interner: Interner, *, new: bool
    ) -> Outcome:
        """Apply a Delta request; `new` when this type had no state on the stream yet."""
        # Initial versions count only on the first request, which is the only one that
        # reads them (so a plain ACK, handled off the stream's task, never raises).
        count = len(req.resource_names_subscribe)
        if new:
            count = max(count, len(req.initial_resource_versions))
        if count > MAX_NAMES_PER_TYPE:
            raise TooManyNames(self.type_url, count)
        sub = frozenset(req.resource_names_subscribe)
        unsub = frozenset(req.resource_names_unsubscribe)
        wildcard_type = self.type_url in typeurls.WILDCARD_TYPES
        if new:
            self.wildcard = wildcard_type and (not sub or WILDCARD in sub)
            self._set_names(sub - {WILDCARD}, interner)
            # On reconnect the client tells us what it has: don't resend those versions.
            self.versions = {
                n: v
                for n, v in req.initial_resource_versions.items()
                if self.wildcard or n in self.names
            }
            self.delta_base = () if self.wildcard and not self.versions else None
            # Explicit names are the reply's scope so that missing ones are reported.
            scope = None if self.wildcard else self.names
            return Outcome(Kind.INIT, Reply(scope), added=self.names)

        kind = self.on_request(req, self.version_sent) or Kind.SUBSCRIPTION
        if sub or unsub:
            self.delta_base = None
        # Subscription changes apply whatever the nonce: unlike SotW they are never
        # repeated, so dropping them with a stale ACK would lose them for good.
        became_wildcard = False
        if WILDCARD in sub and wildcard_type and not self.wildcard:
            self.wildcard = became_wildcard = True
        if WILDCARD in unsub and self.wildcard:
            self.wildcard = False
        explicit = sub - {WILDCARD}
        removed = (unsub - {WILDCARD}) & self.names
        added = explicit - self.names
        if added or unsub:
            names = (self.names | explicit) - unsub
            if len(names) > MAX_NAMES_PER_TYPE:
                raise TooManyNames(self.type_url, len(names))
            # Only on a real change: an ACK (no names) keeps the interned set, so caches
            # keyed by it still match by identity.
            self._set_names(names, interner)
        if not self.wildcard:
            if unsub:
                # The client dropped what it no longer watches; forget its versions so
                # a later re-subscribe is answered, and never name them in removals.
                # (Versions only ever hold subscribed names, so without an unsubscribe
                # there is nothing to drop: an ACK does not scan them.)
                for n in [n for n in self.versions if n not in self.names]:
                    del self.versions[n]
            # An explicit subscribe is a request for the resource even if we think
            # the client has it (Envoy re-subscribes for warming clusters).
            for n in explicit:
                self.versions.pop(n, None)
        if became_wildcard:
            return Outcome(kind, Reply(), added=added, removed=removed)
        if explicit and not self.wildcard:
            return Outcome(kind, Reply(explicit), added=added, removed=removed)
        dirty = self.take_dirty() if kind in (Kind.ACK, Kind.NACK) else None
        return Outcome(kind, dirty=dirty, added=added, removed=removed)

    def _set_names(self, names: frozenset[str], interner: Interner) -> frozenset[str]:
        """Replace `names`, holding the shared (interned) set for as long as it is used."""
        names = interner.acquire(names)
        interner.release(self.names)
        self.names = names
        return names

    def release(self, interner: Interner) -> None:
        """The stream is over: let go of the shared subscription."""
        interner.release(self.names)
        self.names = frozenset()

    # --- pushes and responses -------------------------------------------------------------

    def defer(self, request: PushRequest) -> None:
        """A push arrived while awaiting the ACK: merge it, to send when the ACK comes."""
        self.dirty = request if self.dirty is None else self.dirty.merge(request)

    def take_dirty(self) -> PushRequest | None:
        dirty, self.dirty = self.dirty, None
        return dirty

    def set_always_respond(self, value: bool) -> None:
        self.always_respond = value

    def sent_sotw(
        self, nonce: str, version: str, resources: Sequence[Resource], full: bool
    ) -> None:
        """A SotW response went out with `resources` (`full`: the whole set)."""
        self.sent(nonce, version)
        self._record(resources, full)

    def sent_delta(
        self,
        nonce: str,
        version: str,
        changed: Sequence[Resource],
        removed: Iterable[str],
        full: Sequence[Resource] | None,
        changed_versions: Iterable[Mapping[str, str]] | None = None,
    ) -> None:
        """A Delta response went out; `full` is the whole set when it was complete.
        `changed_versions`, when given, are the name -> version maps of `changed`
        (built once for every stream of a scope)."""
        self.sent(nonce, version)
        versions = self.versions
        if changed_versions is not None:
            for m in changed_versions:
                versions.update(m)
        else:
            for r in changed:
                versions[r.name] = r.version
        for n in removed:
            versions.pop(n, None)
        if full is not None:
            self._record(full, True)
            # Changed set, removed the rest: the versions are now exactly `full`'s.
            self.delta_base = full if self.wildcard else None
        else:
            self._record(changed, False)
            self.delta_base = None

    def forget_versions(self, names: Iterable[str]) -> None:
        """Delta: the client must get these again (an updated cluster re-warms)."""
        self.delta_base = None
        for n in names:
            self.versions.pop(n, None)

    def _record(self, resources: Sequence[Resource], full: bool) -> None:
        if full:
            self.sent_base = resources
            self.sent_updates = {}
        else:
            for r in resources:
                self.sent_updates[r.name] = r


def names_region(req: Any) -> bytes | None:
    """The serialized resource_names of a SotW request, or None if not found cheaply.

    Serializers write fields in number order: version_info (1), node (2), the names
    (3), type_url (4), response_nonce (5), error_detail (6). For a request without node
    and error_detail, the names are what lies between field 1 and fields 4 and 5.
    Equal regions mean equal name lists.
    """
    raw: bytes | None = getattr(req, "raw", None)
    if raw is None or req.HasField("node") or req.HasField("error_detail"):
        return None
    head = wire.field(1, req.version_info.encode()) if req.version_info else b""
    tail = wire.field(4, req.type_url.encode())
    if req.response_nonce:
        tail += wire.field(5, req.response_nonce.encode())
    if not raw.startswith(head) or not raw.endswith(tail):
        return None
    return raw[len(head) : len(raw) - len(tail)]
