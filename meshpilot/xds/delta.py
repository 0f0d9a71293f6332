"""Delta (incremental) responses: only what changed for the client, and what is gone.

Envoy's Delta xDS keeps per-name versions on both sides: a response carries resources
whose version differs from what the client has, and names removed (or, for names it
asked for explicitly, that do not exist, so Envoy stops waiting for them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from envoy.config.core.v3 import base_pb2

from meshpilot.xds import typeurls, wire
from meshpilot.xds.resources import Generated
from meshpilot.xds.watched import WatchedResource


class DeltaResponses:
    """Builds DeltaDiscoveryResponse bytes and records what each stream was sent."""

    def __init__(
        self, encoder: wire.Encoder, next_nonce: Callable[[], str], identifier: str
    ) -> None:
        self._encoder = encoder
        self._next_nonce = next_nonce
        self._control_plane = base_pb2.ControlPlane(identifier=identifier).SerializeToString()

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
