"""Cache-key parts that say what a proxy sees, so that namespaces seeing the same
share generated output.

Istio keys its XdsCache entries by the configs each resource depends on; most of them do
not depend on the proxy's namespace as such, only on what the namespace sees: which
services (exportTo, Sidecar), which DestinationRule applies (rules in the namespace
itself, exportTo), which VirtualServices (exportTo, sourceNamespace matches). A *view*
names that: the empty string for every namespace that sees the mesh-wide default, the
namespace otherwise. Tokens are small integers standing for long fingerprints (a
service as clusters see it, the mesh settings), interned so keys hash cheaply.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.routing import VirtualServiceIndex, exported_to
from meshpilot.model.service import Service
from meshpilot.model.sidecar_scope import SidecarScope
from meshpilot.xds.cache import ScopeKey, XdsCache

_MAX_TOKENS = 200_000


class MeshViews:
    """Views and tokens, memoized per push context."""

    def __init__(self) -> None:
        self._host_tokens: XdsCache[str, int] = XdsCache()
        self._vs_indexes: XdsCache[str, VirtualServiceIndex] = XdsCache()
        self._mesh_tokens: XdsCache[str, int] = XdsCache()
        self._tokens: dict[Hashable, int] = {}
        self._next_token = itertools.count(1)

    def token_count(self) -> int:
        """Interned fingerprints held."""
        return len(self._tokens)

    def rule_view(self, push: PushContext, namespace: str) -> str:
        """A name for how DestinationRules look from `namespace`: "" for every namespace
        that has no rules of its own (and is not the root namespace) while every rule is
        exported everywhere; those see the same rule for every host, so what depends on
        the namespace only through rule lookup is shared by all of them."""
        index = push.destination_rules
        if namespace == index.root_namespace or index.by_ns.get(namespace):
            return namespace
        return "" if self.rules_everywhere(push) else namespace

    def rules_everywhere(self, push: PushContext) -> bool:
        def make() -> int:
            return int(
                all(
                    exported_to(dr.spec.export_to, dr.config.namespace, "")
                    for rules in push.destination_rules.by_ns.values()
                    for dr in rules.values()
                )
            )

        return bool(self._mesh_tokens.get_or_build(push.version, "rules-everywhere", make))

    def visible_view(self, push: PushContext, scope: SidecarScope) -> Hashable:
        """The scope's key, or one key for every default scope (no Sidecar) while every
        service is exported everywhere: those all see every service."""
        if scope.sidecar is None and self.services_everywhere(push):
            return ("default", "*")
        return scope.key

    def services_everywhere(self, push: PushContext) -> bool:
        def make() -> int:
            return int(all("*" in svc.export_to for svc in push.services_sorted))

        return bool(self._mesh_tokens.get_or_build(push.version, "services-everywhere", make))

    def cds_scope(self, push: PushContext, proxy: Proxy, scope: ScopeKey) -> ScopeKey:
        """The key of a scope's outbound clusters: they depend on the visible services
        and the rules that apply to them, not on the namespace as such."""
        sidecar_scope = push.sidecar_scope(proxy)
        view = (self.visible_view(push, sidecar_scope), self.rule_view(push, proxy.namespace))
        # The DNS domain and the proxy's own part do not change clusters either.
        return dataclasses.replace(scope, sidecar_scope=view, instances=(), ips=(), dns_domain="")

    def lds_scope(self, push: PushContext, proxy: Proxy, scope: ScopeKey) -> ScopeKey:
        """The key of a scope's outbound listeners: visible services, the rules and
        VirtualServices (TCP/TLS routes) that apply to them; not the DNS domain."""
        sidecar_scope = push.sidecar_scope(proxy)
        view = (
            self.visible_view(push, sidecar_scope),
            self.rule_view(push, proxy.namespace),
            self.routing_view(push, proxy.namespace),
        )
        return dataclasses.replace(scope, sidecar_scope=view, instances=(), ips=(), dns_domain="")

    def vs_index(self, push: PushContext, namespace: str) -> VirtualServiceIndex:
        """The VirtualServices visible from `namespace`: one index for all namespaces
        of the same routing view (it is the same index)."""
        view = self.routing_view(push, namespace)
        if view:
            return push.virtual_services(namespace)
        return self._vs_indexes.get_or_build(
            push.version, "", lambda: push.virtual_services(namespace)
        )

    def routing_view(self, push: PushContext, namespace: str) -> str:
        """ "" for every namespace while each VirtualService is exported everywhere and
        none matches on sourceNamespace: they all see the same routing; else the
        namespace."""

        def make() -> int:
            for vs in push.virtual_services_all:
                if not exported_to(vs.spec.export_to, vs.config.namespace, ""):
                    return 0
                spec = vs.spec
                if (
                    any(m.source_namespace for r in spec.http for m in r.match)
                    or any(m.source_namespace for t in spec.tcp for m in t.match)
                    or any(m.source_namespace for s in spec.tls for m in s.match)
                ):
                    return 0
            return 1

        everywhere = self._mesh_tokens.get_or_build(push.version, "routing-everywhere", make)
        return "" if everywhere else namespace

    def host_token(self, push: PushContext, svc: Service) -> int:
        """A token for everything an outbound cluster takes from its service: the
        service itself, its endpoints' identities and TLS modes (auto mTLS) and the
        mTLS mode of its namespace. Equal content, equal token, in any push context."""

        def make() -> int:
            modes = tuple(
                (port, frozenset(ep.tls_mode for ep in eps))
                for port, eps in sorted(push.endpoints.get(svc.hostname, {}).items())
            )
            return self.intern(
                (
                    svc.hostname,
                    svc.namespace,
                    svc.name,
                    svc.ports,
                    svc.resolution,
                    svc.addresses,
                    svc.mesh_external,
                    svc.source,
                    push.service_identities(svc),
                    modes,
                    push.security.namespace_mtls_mode(svc.namespace),
                )
            )

        return self._host_tokens.get_or_build(push.version, svc.hostname, make)

    def mesh_token(self, push: PushContext) -> int:
        return self._mesh_tokens.get_or_build(
            push.version, "", lambda: self.intern(push.mesh.model_dump_json())
        )

    def intern(self, fingerprint: Hashable) -> int:
        token = self._tokens.get(fingerprint)
        if token is None:
            if len(self._tokens) >= _MAX_TOKENS:
                # Fresh tokens from here on: old keys then miss, never match wrongly.
                self._tokens.clear()
            token = self._tokens[fingerprint] = next(self._next_token)
        return token
