"""State-of-the-world responses: the whole subscribed set (or the names just asked for).

Istio answers a SotW request with every resource of the subscription; pushes are
skipped when nothing changed for the proxy. A push sends the very same resources to
every proxy of a scope, so the whole message is built once (one nonce) and shared; a
nonce still stays unique within each stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from envoy.config.core.v3 import base_pb2

from meshpilot.xds import wire
from meshpilot.xds.resources import Generated, Resource, same_versions
from meshpilot.xds.watched import WatchedResource


class SotwResponses:
    """Builds DiscoveryResponse bytes and records what each stream was sent."""

    def __init__(
        self, encoder: wire.Encoder, next_nonce: Callable[[], str], identifier: str
    ) -> None:
        self._encoder = encoder
        self._next_nonce = next_nonce
        self._control_plane = base_pb2.ControlPlane(identifier=identifier).SerializeToString()
        # Whole push messages of the current push context, shared across streams.
        self._shared: dict[tuple[int, str], tuple[Sequence[Resource], str, bytes]] = {}
        self._shared_version = ""

    def __len__(self) -> int:
        """Shared messages held (for the current push context only)."""
        return len(self._shared)

    def build(
        self,
        w: WatchedResource,
        gen: Generated,
        version: str,
        scope: frozenset[str] | None,
        forced: bool,
    ) -> bytes | None:
        """The response to send for `w`, or None if the proxy has all of it already."""
        resources = gen.resources
        full = gen.complete and scope is None
        if not forced:
            if not resources and not gen.complete:
                return None
            if (
                full
                and not w.sent_updates
                and not w.always_respond
                and same_versions(w.sent_base, resources)
            ):
                # Unchanged for this proxy; after a NACK this is what keeps us from
                # resending the rejected config. EDS right after a CDS change still
                # goes: updated clusters warm until they get their endpoints.
                return None
        shared = None
        # Only cached (shared) answers are worth sharing: one built for this request
        # alone would only hold memory until the next push context.
        share = not forced and bool(resources) and gen.shared
        key = (id(resources), w.type_url)
        if share:
            if self._shared_version != version:
                self._shared.clear()
                self._shared_version = version
            shared = self._shared.get(key)
            if shared is not None and (shared[0] is not resources or shared[1] == w.nonce_sent):
                # Not this object (its id was reused), or this stream got this message:
                # a fresh nonce then.
                shared = None
        if shared is not None:
            nonce, data = shared[1], shared[2]
        else:
            nonce = self._next_nonce()
            block = self._encoder.block(resources, False, gen.shared) if resources else b""
            data = wire.sotw_response(version, w.type_url, nonce, self._control_plane, block)
            if share:
                self._shared[key] = (resources, nonce, data)
        w.sent_sotw(nonce, version, resources, full)
        return data
