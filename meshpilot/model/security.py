"""PeerAuthentication and AuthorizationPolicy as they apply to one workload.

Istio's rules (pilot/pkg/model/authentication.go and authorization.go):

* PeerAuthentication: a mesh-wide policy (root namespace, no selector), a
  namespace-wide one (no selector) and a workload one (selector, in the workload's
  namespace; selectors in the root namespace are ignored). The narrowest that sets a
  mode wins, `UNSET` inherits from the wider scope, and nothing at all means
  PERMISSIVE. Within one scope the oldest policy wins. `portLevelMtls` is honoured
  only on workload policies; an `UNSET` port inherits the workload's mode.
* AuthorizationPolicy: every policy in the root namespace and in the workload's
  namespace whose selector matches the workload's labels (no selector: all of them).
  Policies with `targetRef(s)` are for gateways and waypoints, never for sidecars.

Built once per PushContext from the store snapshot; lookups are memoized per
(namespace, labels), so the many proxies of one deployment cost one walk.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from meshpilot.api.security import (
    AuthorizationPolicySpec,
    MutualTLS,
    PeerAuthenticationSpec,
)
from meshpilot.config import Config, ConfigKey, kinds, oldest_first
from meshpilot.model.service import labels_match

STRICT = "STRICT"
PERMISSIVE = "PERMISSIVE"
DISABLE = "DISABLE"
UNSET = "UNSET"

ALLOW = "ALLOW"
DENY = "DENY"
AUDIT = "AUDIT"
CUSTOM = "CUSTOM"

Labels = Mapping[str, str]


@dataclass(frozen=True, slots=True)
class PeerAuthnPolicy:
    """The composed PeerAuthentication of one workload (Istio's ComposePeerAuthentication)."""

    mode: str = PERMISSIVE
    port_modes: Mapping[int, str] = field(default_factory=dict)
    # (namespace, name, revision) of the policies that made it: part of cache keys.
    sources: tuple[tuple[str, str, str], ...] = ()

    def mode_for(self, port: int) -> str:
        """The mode on workload port `port` (portLevelMtls keys are workload ports)."""
        return self.port_modes.get(port, self.mode)


DEFAULT_PEER_AUTHN = PeerAuthnPolicy()


@dataclass(frozen=True, slots=True)
class AuthzPolicies:
    """AuthorizationPolicies that apply to one workload, by action, oldest first."""

    custom: tuple[Config, ...] = ()
    deny: tuple[Config, ...] = ()
    allow: tuple[Config, ...] = ()
    audit: tuple[Config, ...] = ()

    @property
    def empty(self) -> bool:
        return not (self.custom or self.deny or self.allow or self.audit)

    @property
    def sources(self) -> tuple[tuple[str, str, str], ...]:
        return tuple(
            (c.namespace, c.name, c.revision)
            for c in (*self.custom, *self.deny, *self.allow, *self.audit)
        )


NO_AUTHZ = AuthzPolicies()


def _by_namespace(configs: Iterable[Config]) -> dict[str, tuple[Config, ...]]:
    out: dict[str, list[Config]] = {}
    for cfg in configs:
        out.setdefault(cfg.namespace, []).append(cfg)
    return {ns: tuple(oldest_first(v)) for ns, v in out.items()}


def _mode(mtls: MutualTLS | None) -> str:
    return mtls.mode if mtls is not None else UNSET


def _has_selector(spec: PeerAuthenticationSpec | AuthorizationPolicySpec) -> bool:
    return spec.selector is not None and bool(spec.selector.match_labels)


class SecurityIndex:
    """Per-push index of PeerAuthentication and AuthorizationPolicy configs."""

    def __init__(self, configs: Mapping[str, Mapping[ConfigKey, Config]], root_namespace: str):
        self.root_namespace = root_namespace
        self._peer = _by_namespace(configs.get(kinds.PEER_AUTHENTICATION, {}).values())
        self._authz = _by_namespace(configs.get(kinds.AUTHORIZATION_POLICY, {}).values())
        self._peer_memo: dict[tuple[str, Hashable], PeerAuthnPolicy] = {}
        self._authz_memo: dict[tuple[str, Hashable], AuthzPolicies] = {}
        self._ns_mode_memo: dict[str, str] = {}

    @property
    def has_peer_authentication(self) -> bool:
        return bool(self._peer)

    # --- PeerAuthentication ----------------------------------------------------------

    def _mesh_and_namespace(self, namespace: str) -> tuple[Config | None, Config | None]:
        mesh = next(
            (c for c in self._peer.get(self.root_namespace, ()) if not _has_selector(c.spec)),
            None,
        )
        ns = None
        if namespace != self.root_namespace:
            ns = next((c for c in self._peer.get(namespace, ()) if not _has_selector(c.spec)), None)
        return mesh, ns

    def peer_authentication(self, namespace: str, labels: Labels) -> PeerAuthnPolicy:
        """The effective PeerAuthentication of a workload in `namespace` with `labels`."""
        workload = None
        if namespace != self.root_namespace:
            workload = next(
                (
                    c
                    for c in self._peer.get(namespace, ())
                    if _has_selector(c.spec) and labels_match(c.spec.selector.match_labels, labels)
                ),
                None,
            )
        memo_key = (namespace, workload.key if workload is not None else None)
        cached = self._peer_memo.get(memo_key)
        if cached is not None:
            return cached
        mesh, ns = self._mesh_and_namespace(namespace)
        used = [c for c in (mesh, ns, workload) if c is not None]
        if not used:
            result = DEFAULT_PEER_AUTHN
        else:
            mode = PERMISSIVE
            for cfg in used:
                # Mesh, then namespace, then workload: narrower scopes override.
                if _mode(cfg.spec.mtls) != UNSET:
                    mode = _mode(cfg.spec.mtls)
            ports: dict[int, str] = {}
            if workload is not None:
                for port, mtls in workload.spec.port_level_mtls.items():
                    ports[int(port)] = mode if _mode(mtls) == UNSET else _mode(mtls)
            result = PeerAuthnPolicy(
                mode,
                MappingProxyType(ports),
                tuple((c.namespace, c.name, c.revision) for c in used),
            )
        self._peer_memo[memo_key] = result
        return result

    def namespace_mtls_mode(self, namespace: str) -> str:
        """Istio's GetNamespaceMutualTLSMode with BestEffortInferServiceMTLSMode's fallback:
        what the servers of a namespace accept, ignoring workload and port policies."""
        cached = self._ns_mode_memo.get(namespace)
        if cached is None:
            mode = PERMISSIVE
            for cfg in self._mesh_and_namespace(namespace):
                if cfg is not None and _mode(cfg.spec.mtls) != UNSET:
                    mode = _mode(cfg.spec.mtls)
            cached = self._ns_mode_memo[namespace] = mode
        return cached

    # --- AuthorizationPolicy ---------------------------------------------------------

    def authorization_policies(self, namespace: str, labels: Labels) -> AuthzPolicies:
        """The AuthorizationPolicies that apply to a sidecar in `namespace` with `labels`."""
        namespaces = [self.root_namespace]
        if namespace != self.root_namespace:
            namespaces.append(namespace)
        selected: list[Config] = []
        for ns in namespaces:
            for cfg in self._authz.get(ns, ()):
                spec: AuthorizationPolicySpec = cfg.spec
                if spec.target_ref is not None or spec.target_refs:
                    continue  # gateways and waypoints only
                if spec.selector is not None and not labels_match(
                    spec.selector.match_labels, labels
                ):
                    continue
                selected.append(cfg)
        memo_key = (namespace, tuple(c.key for c in selected))
        cached = self._authz_memo.get(memo_key)
        if cached is not None:
            return cached
        by_action: dict[str, list[Config]] = {ALLOW: [], DENY: [], AUDIT: [], CUSTOM: []}
        for cfg in selected:
            by_action[cfg.spec.action].append(cfg)
        result = (
            AuthzPolicies(
                tuple(by_action[CUSTOM]),
                tuple(by_action[DENY]),
                tuple(by_action[ALLOW]),
                tuple(by_action[AUDIT]),
            )
            if selected
            else NO_AUTHZ
        )
        self._authz_memo[memo_key] = result
        return result

    def inbound_key(self, namespace: str, labels: Labels) -> Hashable:
        """What a workload's inbound security config depends on: the policies that apply
        to it, by identity and revision. Equal keys, equal output (for one push)."""
        peer = self.peer_authentication(namespace, labels)
        authz = self.authorization_policies(namespace, labels)
        if not peer.sources and authz.empty:
            return None
        return (peer.sources, authz.sources)
