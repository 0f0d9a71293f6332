"""Delta (incremental) responses: only what changed for the client, and what is gone.

Envoy's Delta xDS keeps per-name versions on both sides: a response carries resources
whose version differs from what the client has, and names removed (or, for names it
asked for explicitly, that do not exist, so Envoy stops waiting for them).

Streams of one scope hold the same set after a push, and get the same next one: the
diff between two shared sets (or between shared parts of them, see resources.Joined)
is computed and framed once per push and reused by every such stream, instead of once
per stream over every resource.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2

from meshpilot.xds import typeurls, wire
from meshpilot.xds.resources import Generated, Joined, Resource
from meshpilot.xds.watched import WatchedResource


@dataclass(frozen=True, slots=True)
class PartDiff:
    """From one shared set of resources to another: what a client holding `old`
    (exactly) is sent to hold `new`."""

    old: Sequence[Resource]
    new: Sequence[Resource]
    changed: tuple[Resource, ...]
    changed_versions: Mapping[str, str]
    removed: tuple[str, ...]
    names: frozenset[str]
    block: bytes


# Diffs kept per push (streams of a scope reuse them); a bound against many scopes.
MAX_DIFFS = 4096


class DeltaResponses:
    """Builds DeltaDiscoveryResponse bytes and records what each stream was sent."""

    def __init__(
        self, encoder: wire.Encoder, next_nonce: Callable[[], str], identifier: str
    ) -> None:
        self._encoder = encoder
        self._next_nonce = next_nonce
        self._control_plane = base_pb2.ControlPlane(identifier=identifier).SerializeToString()
        self._diffs: dict[tuple[int, int], PartDiff] = {}
        self._diffs_version = ""
        # Diffs computed over shared parts (cached), for tests and debugging.
        self.diffs_computed = 0

    def build(
        self,
        watched: Mapping[str, WatchedResource],
        w: WatchedResource,
        gen: Generated,
        version: str,
        scope: frozenset[str] | None,
        forced: bool,
    ) -> bytes | None:
        """The response to send for `w` (one of the stream's `watched`), or None."""
        base = w.delta_base
        if base is not None and w.wildcard and gen.complete and scope is None and not forced:
            data = self._build_shared(watched, w, gen, version, base)
            if data is not None:
                return data if data else None
        versions = w.versions
        wildcard = w.wildcard
        names = w.names
        changed = [
            r
            for r in gen.resources
            if versions.get(r.name) != r.version and (wildcard or r.name in names)
        ]
        removed: list[str] = []
        if gen.complete:
            present = {r.name for r in gen.resources}
            if scope is None:
                removed = [n for n in versions if n not in present]
            else:
                # Names the client asked for that do not exist: saying so (as removed)
                # lets Envoy finish warming instead of waiting for them.
                removed = [n for n in scope if n not in present and (forced or n in versions)]
            removed.sort()
        if not changed and not removed and not forced:
            return None
        nonce = self._next_nonce()
        if len(changed) == len(gen.resources) and changed:
            block = self._encoder.block(gen.resources, True, gen.shared)
        else:
            block = b"".join([self._encoder.entry(r, True, gen.shared) for r in changed])
        data = wire.delta_response(version, w.type_url, nonce, removed, self._control_plane, block)
        if w.type_url == typeurls.CLUSTER and changed:
            eds = watched.get(typeurls.ENDPOINT)
            if eds is not None:
                # An updated cluster warms until it gets its endpoints again, and a
                # delta client does not re-request them: send them with this push.
                eds.forget_versions(r.name for r in changed)
        full = gen.resources if gen.complete and scope is None else None
        w.sent_delta(nonce, version, changed, removed, full)
        return data

    def _build_shared(
        self,
        watched: Mapping[str, WatchedResource],
        w: WatchedResource,
        gen: Generated,
        version: str,
        base: Sequence[Resource],
    ) -> bytes | None:
        """The response from diffs of parts, shared with other streams where the parts
        are shared: b"" when nothing changed, None when the parts do not line up."""
        old_parts, _ = _parts(base, True)
        new_parts, shared = _parts(gen.resources, gen.shared)
        if not base:
            old_parts = ((),) * len(new_parts)
        if len(old_parts) != len(new_parts):
            return None
        if self._diffs_version != version:
            self._diffs.clear()
            self._diffs_version = version
        diffs = [
            self._part_diff(old, new, keep)
            for old, new, keep in zip(old_parts, new_parts, shared, strict=True)
        ]
        removed: list[str] = []
        for i, d in enumerate(diffs):
            for n in d.removed:
                # A name that moved to another part is not removed.
                if not any(n in o.names for j, o in enumerate(diffs) if j != i):
                    removed.append(n)
        if not removed and not any(d.changed for d in diffs):
            return b""
        removed.sort()
        nonce = self._next_nonce()
        block = b"".join([d.block for d in diffs])
        data = wire.delta_response(version, w.type_url, nonce, removed, self._control_plane, block)
        changed = [r for d in diffs for r in d.changed]
        if w.type_url == typeurls.CLUSTER and changed:
            eds = watched.get(typeurls.ENDPOINT)
            if eds is not None:
                eds.forget_versions(r.name for r in changed)
        w.sent_delta(
            nonce,
            version,
            changed,
            removed,
            gen.resources,
            changed_versions=[d.changed_versions for d in diffs],
        )
        return data

    def _part_diff(
        self, old: Sequence[Resource], new: Sequence[Resource], shared: bool
    ) -> PartDiff:
        key = (id(old), id(new))
        if shared:
            cached = self._diffs.get(key)
            if cached is not None and cached.old is old and cached.new is new:
                return cached
        old_versions = {r.name: r.version for r in old}
        changed = tuple(r for r in new if old_versions.get(r.name) != r.version)
        names = frozenset(r.name for r in new)
        removed = tuple(n for n in old_versions if n not in names)
        if len(changed) == len(new) and changed:
            block = self._encoder.block(new, True, shared)
        else:
            block = b"".join([self._encoder.entry(r, True, shared) for r in changed])
        diff = PartDiff(
            old, new, changed, {r.name: r.version for r in changed}, removed, names, block
        )
        if shared:
            self.diffs_computed += 1
            if len(self._diffs) >= MAX_DIFFS:
                self._diffs.clear()
            self._diffs[key] = diff
        return diff


def _parts(
    resources: Sequence[Resource], shared: bool
) -> tuple[tuple[Sequence[Resource], ...], tuple[bool, ...]]:
    if isinstance(resources, Joined):
        return resources.parts, resources.shared_parts
    return (resources,), (shared,)
