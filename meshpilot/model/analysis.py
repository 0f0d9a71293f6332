"""Config analysis: config that parses but will not do what its author meant.

Like `istioctl analyze`, with Istio's codes and names where Istio has one
(IST0101 ReferencedResourceNotFound, IST0109 ConflictingMeshGatewayVirtualServiceHosts,
IST0112, IST0130, IST0173) and meshpilot's own (MP....) where meshpilot behaves
differently from Istio or does not support something: MP0003 unsupported config,
MP0004 AuthorizationPolicy rules or values the RBAC translation skips (Istio skips them
silently), MP0005 several PeerAuthentications in one scope. A pure function of one
PushContext; the server lists the result at /debug/configz.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshpilot.api.networking import Destination, HTTPRoute, ServerTLSSettings, VirtualServiceSpec
from meshpilot.api.security import AuthorizationPolicySpec, PeerAuthenticationSpec
from meshpilot.config import Config, kinds
from meshpilot.model.routing import MESH_GATEWAY, Conflict, ResolvedVirtualService
from meshpilot.model.service import Resolution, labels_match

# The translation's own rule model says what it skips: one source of truth.
from meshpilot.translators.authz import InvalidRule, Untranslatable, rule_model, when_target
from meshpilot.translators.common import cidr_range

if TYPE_CHECKING:
    from meshpilot.model.push_context import PushContext

ERROR = "Error"
WARNING = "Warning"
INFO = "Info"

REFERENCED_RESOURCE_NOT_FOUND = ("IST0101", "ReferencedResourceNotFound", ERROR)
CONFLICTING_MESH_VS_HOSTS = ("IST0109", "ConflictingMeshGatewayVirtualServiceHosts", ERROR)
PORT_SELECTOR_REQUIRED = ("IST0112", "VirtualServiceDestinationPortSelectorRequired", ERROR)
UNREACHABLE_RULE = ("IST0130", "VirtualServiceUnreachableRule", WARNING)
SUBSET_SELECTS_NO_PODS = ("IST0173", "DestinationRuleSubsetNotSelectPods", ERROR)
# Istio merges DestinationRules for one host; meshpilot keeps the oldest.
CONFLICTING_DESTINATION_RULES = ("MP0001", "ConflictingDestinationRuleHosts", WARNING)
ZERO_TOTAL_WEIGHT = ("MP0002", "ZeroTotalWeight", ERROR)
UNSUPPORTED = ("MP0003", "UnsupportedConfig", WARNING)
# A rule or value the authorization translation skips (Istio skips it too, silently).
INVALID_AUTHZ = ("MP0004", "InvalidAuthorizationPolicyRule", ERROR)
# Several policies of one scope: only the oldest applies.
CONFLICTING_PEER_AUTHN = ("MP0005", "ConflictingPeerAuthentication", WARNING)

_REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
_GRPC_STATUS_NAMES = frozenset(
    {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)


@dataclass(frozen=True, slots=True)
class Message:
    """One finding about one object, with the field it is about."""

    code: str
    name: str
    level: str
    kind: str
    namespace: str
    object_name: str
    origin: str
    field: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "level": self.level,
            "object": {"kind": self.kind, "namespace": self.namespace, "name": self.object_name},
            "origin": self.origin,
            "field": self.field,
            "message": self.message,
        }

    def __str__(self) -> str:
        """istioctl's layout: `Error [IST0101] (VirtualService default/reviews) ...`."""
        where = f" {self.origin}" if self.origin else ""
        field = f" {self.field}:" if self.field else ""
        return (
            f"{self.level} [{self.code}] ({self.kind} {self.namespace}/{self.object_name}"
            f"{where}){field} {self.message}"
        )


def _msg(kind: tuple[str, str, str], cfg: Config, field: str, text: str) -> Message:
    code, name, level = kind
    return Message(code, name, level, cfg.kind, cfg.namespace, cfg.name, cfg.origin, field, text)


def analyze(push: PushContext) -> list[Message]:
    """Every finding, sorted by object and field so that output is stable."""
    out: list[Message] = []
    for vs in push.virtual_services_all:
        out.extend(_virtual_service(push, vs))
    out.extend(_virtual_service_conflicts(push))
    out.extend(_destination_rules(push))
    out.extend(_security(push))
    return sorted(
        dict.fromkeys(out),
        key=lambda m: (m.kind, m.namespace, m.object_name, m.field, m.code, m.message),
    )


# --- VirtualServices --------------------------------------------------------------------


def _destinations(spec: VirtualServiceSpec) -> Iterator[tuple[str, Destination, int]]:
    """(field path, destination, number of destinations in its rule) of every reference."""
    for i, rule in enumerate(spec.http):
        for j, rd in enumerate(rule.route):
            yield f"spec.http[{i}].route[{j}].destination", rd.destination, len(rule.route)
        if rule.mirror is not None:
            yield f"spec.http[{i}].mirror", rule.mirror, 1
        for j, m in enumerate(rule.mirrors):
            yield f"spec.http[{i}].mirrors[{j}].destination", m.destination, 1
    for i, tcp in enumerate(spec.tcp):
        for j, rd in enumerate(tcp.route):
            yield f"spec.tcp[{i}].route[{j}].destination", rd.destination, len(tcp.route)
    for i, tls in enumerate(spec.tls):
        for j, rd in enumerate(tls.route):
            yield f"spec.tls[{i}].route[{j}].destination", rd.destination, len(tls.route)


def _virtual_service(push: PushContext, vs: ResolvedVirtualService) -> Iterator[Message]:
    cfg = vs.config
    spec = vs.spec
    yield from _gateways(push, cfg, spec.gateways, "spec.gateways")
    for path, dest, _ in _destinations(spec):
        yield from _destination(push, cfg, path, dest)
    for i, rule in enumerate(spec.http):
        yield from _http_rule(cfg, i, rule)
        if not rule.match and i < len(spec.http) - 1:
            yield _msg(
                UNREACHABLE_RULE,
                cfg,
                f"spec.http[{i + 1}]",
                f"VirtualService rule #{i + 1} not used (only the last rule can have no "
                f"matches: rule #{i} matches every request).",
            )
        for j, m in enumerate(rule.match):
            yield from _gateways(push, cfg, m.gateways, f"spec.http[{i}].match[{j}].gateways")
    for proto, rules in (("tcp", spec.tcp), ("tls", spec.tls)):
        for i, l4 in enumerate(rules):
            path = f"spec.{proto}[{i}]"
            yield from _weights(cfg, path, [rd.weight for rd in l4.route])
            for j, m in enumerate(l4.match):
                if m.destination_subnets:
                    yield _msg(
                        UNSUPPORTED,
                        cfg,
                        f"{path}.match[{j}].destinationSubnets",
                        "destinationSubnets is not supported by meshpilot; this match is ignored",
                    )


def _http_rule(cfg: Config, i: int, rule: HTTPRoute) -> Iterator[Message]:
    path = f"spec.http[{i}]"
    if rule.delegate is not None:
        yield _msg(
            UNSUPPORTED,
            cfg,
            f"{path}.delegate",
            "delegate is not supported by meshpilot; this rule is ignored",
        )
    if rule.redirect is not None and rule.redirect.redirect_code not in _REDIRECT_CODES:
        yield _msg(
            UNSUPPORTED,
            cfg,
            f"{path}.redirect.redirectCode",
            f"redirect code {rule.redirect.redirect_code} is not one Envoy can send "
            "(301, 302, 303, 307, 308); this rule is ignored",
        )
    if rule.route and rule.redirect is None and rule.direct_response is None:
        yield from _weights(cfg, path, [rd.weight for rd in rule.route])
    fault = rule.fault
    if fault is not None:
        if fault.delay is not None and fault.delay.fixed_delay is None:
            yield _msg(
                UNSUPPORTED,
                cfg,
                f"{path}.fault.delay",
                "only fixedDelay is supported (as in Istio); this delay is ignored",
            )
        abort = fault.abort
        if abort is not None and abort.http_status is None:
            grpc = (abort.grpc_status or "").upper()
            if grpc not in _GRPC_STATUS_NAMES:
                yield _msg(
                    UNSUPPORTED,
                    cfg,
                    f"{path}.fault.abort",
                    "only httpStatus and known grpcStatus names are supported (as in "
                    "Istio); this abort is ignored",
                )


def _weights(cfg: Config, path: str, weights: list[int]) -> Iterator[Message]:
    if len(weights) > 1 and not any(weights):
        yield _msg(
            ZERO_TOTAL_WEIGHT,
            cfg,
            f"{path}.route",
            f"all {len(weights)} destinations have weight 0, so none gets traffic: "
            "requests get 503 (HTTP) or connections go to BlackHoleCluster (TCP/TLS)",
        )


def _destination(push: PushContext, cfg: Config, path: str, dest: Destination) -> Iterator[Message]:
    host = push.resolve_host(dest.host, cfg.namespace)
    svc = push.services.get(host)
    if svc is None:
        short = (
            f" ({dest.host!r} is {host} from namespace {cfg.namespace})"
            if host != dest.host
            else ""
        )
        yield _msg(
            REFERENCED_RESOURCE_NOT_FOUND,
            cfg,
            f"{path}.host",
            f"Referenced host not found: {host!r}{short}; no service or ServiceEntry has "
            "this host, so this destination is dropped (503 when it was the only one)",
        )
        return
    if dest.port is not None and svc.port(dest.port.number) is None:
        ports = ", ".join(str(p.port) for p in svc.ports)
        yield _msg(
            REFERENCED_RESOURCE_NOT_FOUND,
            cfg,
            f"{path}.port.number",
            f"Referenced host:port not found: '{host}:{dest.port.number}'; the service's "
            f"ports are {ports}",
        )
    if dest.port is None and len(svc.ports) > 1:
        ports = [p.port for p in svc.ports]
        yield _msg(
            PORT_SELECTOR_REQUIRED,
            cfg,
            f"{path}.port",
            f"This VirtualService routes to a service {host!r} that exposes multiple ports "
            f"{ports}. Specifying a port in the destination is required to disambiguate "
            "(meshpilot uses the port the request came in on).",
        )
    if dest.subset:
        dr = push.destination_rule(cfg.namespace, svc)
        subsets = [s.name for s in dr.spec.subsets] if dr is not None else []
        if dest.subset not in subsets:
            where = (
                f"DestinationRule {dr.config.namespace}/{dr.config.name} defines "
                f"{', '.join(subsets) or 'no subsets'}"
                if dr is not None
                else f"no DestinationRule for {host} applies in namespace {cfg.namespace}"
            )
            yield _msg(
                REFERENCED_RESOURCE_NOT_FOUND,
                cfg,
                f"{path}.subset",
                f"Referenced host+subset in destinationrule not found: "
                f"'{host}+{dest.subset}' ({where}); traffic for it gets 503",
            )


def _gateways(push: PushContext, cfg: Config, gateways: list[str], path: str) -> Iterator[Message]:
    known = push.configs(kinds.GATEWAY)
    for i, ref in enumerate(gateways):
        if ref == MESH_GATEWAY:
            continue
        ns, sep, name = ref.partition("/")
        if not sep:
            ns, name = cfg.namespace, ref
        if not any(k.namespace == ns and k.name == name for k in known):
            yield _msg(
                REFERENCED_RESOURCE_NOT_FOUND,
                cfg,
                f"{path}[{i}]",
                f"Referenced gateway not found: {f'{ns}/{name}'!r}",
            )


def _virtual_service_conflicts(push: PushContext) -> Iterator[Message]:
    """Istio's ConflictingMeshGatewayVirtualServiceHosts, for every namespace a proxy
    may be in (exportTo makes the winner differ between namespaces)."""
    seen: set[tuple[str, tuple[Any, ...]]] = set()
    for ns in sorted(_namespaces(push)):
        for conflict in push.virtual_services(ns).conflicts:
            key = (conflict.host, tuple(c.key for c in (conflict.winner, *conflict.losers)))
            if key in seen:
                continue
            seen.add(key)
            yield from _conflict_messages(conflict)


def _conflict_messages(conflict: Conflict) -> Iterator[Message]:
    involved = (conflict.winner, *conflict.losers)
    names = ", ".join(f"{c.namespace}/{c.name}" for c in involved)
    winner = f"{conflict.winner.namespace}/{conflict.winner.name}"
    text = (
        f"The VirtualServices {names} associated with mesh gateway define the same host "
        f"{conflict.host} which can lead to undefined behavior. meshpilot uses {winner} "
        "(the oldest, then by name) and ignores the others for this host. This can be "
        "fixed by merging the conflicting VirtualServices into a single resource."
    )
    for cfg in involved:
        yield _msg(CONFLICTING_MESH_VS_HOSTS, cfg, "spec.hosts", text)


def _namespaces(push: PushContext) -> set[str]:
    out = {svc.namespace for svc in push.services_sorted}
    for by_key in push.snapshot.by_kind.values():
        out.update(k.namespace for k in by_key)
    return out


# --- DestinationRules -------------------------------------------------------------------


def _destination_rules(push: PushContext) -> Iterator[Message]:
    index = push.destination_rules
    for conflict in index.conflicts:
        involved = (conflict.winner, *conflict.losers)
        names = ", ".join(f"{c.namespace}/{c.name}" for c in involved)
        winner = f"{conflict.winner.namespace}/{conflict.winner.name}"
        text = (
            f"The DestinationRules {names} define the same host {conflict.host}; meshpilot "
            f"uses {winner} (the oldest, then by name) and ignores the others (Istio would "
            "merge their subsets). Merge them into a single resource."
        )
        for cfg in involved:
            yield _msg(CONFLICTING_DESTINATION_RULES, cfg, "spec.host", text)
    for rules in index.by_ns.values():
        for dr in rules.values():
            svc = push.services.get(dr.host)
            if svc is None or svc.resolution is not Resolution.CLIENT_SIDE_LB:
                continue  # wildcard or DNS hosts: endpoints have no labels to select
            endpoints = [
                ep for per_port in push.endpoints.get(svc.hostname, {}).values() for ep in per_port
            ]
            for i, subset in enumerate(dr.spec.subsets):
                if not any(labels_match(subset.labels, ep.labels) for ep in endpoints):
                    yield _msg(
                        SUBSET_SELECTS_NO_PODS,
                        dr.config,
                        f"spec.subsets[{i}]",
                        f"The Subset {subset.name} defined in the DestinationRule does not "
                        f"select any pods (labels {dict(subset.labels)} match no endpoint "
                        f"of {svc.hostname}). Which may lead to 503 UH (NoHealthyUpstream).",
                    )


# --- security ---------------------------------------------------------------------------


def _security(push: PushContext) -> Iterator[Message]:
    for cfg in push.configs(kinds.AUTHORIZATION_POLICY).values():
        yield from _authorization_policy(cfg)
    yield from _peer_authentications(push)
    for cfg in push.configs(kinds.SIDECAR).values():
        for i, il in enumerate(cfg.spec.ingress):
            if il.tls is not None:
                yield from _sidecar_ingress_tls(cfg, f"spec.ingress[{i}].tls", il.tls)


def _authorization_policy(cfg: Config) -> Iterator[Message]:
    spec: AuthorizationPolicySpec = cfg.spec
    if spec.target_ref is not None or spec.target_refs:
        yield _msg(
            UNSUPPORTED,
            cfg,
            "spec.targetRefs" if spec.target_refs else "spec.targetRef",
            "targetRef policies apply to gateways and waypoints, which meshpilot does not "
            "build yet; no sidecar enforces this policy",
        )
    if spec.action == "CUSTOM":
        name = spec.provider.name if spec.provider is not None else ""
        yield _msg(
            UNSUPPORTED,
            cfg,
            "spec.provider",
            f"CUSTOM authorization needs the ext_authz provider {name!r} from MeshConfig "
            "extensionProviders, which meshpilot does not support: as Istio does for a "
            "provider it cannot find, requests this policy matches are denied",
        )
    for i, rule in enumerate(spec.rules):
        path = f"spec.rules[{i}]"
        try:
            rule_model(rule, cfg.namespace)
        except InvalidRule as e:
            yield _msg(INVALID_AUTHZ, cfg, f"{path}.when", f"{e}: this rule is skipped")
            continue
        jwt = any(
            f.source.request_principals or f.source.not_request_principals for f in rule.from_
        )
        jwt = jwt or any(c.key.startswith("request.auth.") for c in rule.when)
        if jwt:
            yield _msg(
                UNSUPPORTED,
                cfg,
                path,
                "requestPrincipals and request.auth.* need RequestAuthentication (JWT), which "
                "meshpilot does not support: they never match (their not* forms always do)",
            )
        for j, f in enumerate(rule.from_):
            s = f.source
            for field, values in (
                ("ipBlocks", s.ip_blocks),
                ("notIpBlocks", s.not_ip_blocks),
                ("remoteIpBlocks", s.remote_ip_blocks),
                ("notRemoteIpBlocks", s.not_remote_ip_blocks),
            ):
                for v in values:
                    if cidr_range(v) is None:
                        yield _bad_value(cfg, spec, f"{path}.from[{j}].source.{field}", v)
        for j, t in enumerate(rule.to):
            for field, values in (
                ("ports", t.operation.ports),
                ("notPorts", t.operation.not_ports),
            ):
                for v in values:
                    if not v.isdigit() or int(v) > 65535:
                        yield _bad_value(cfg, spec, f"{path}.to[{j}].operation.{field}", v)
        for j, c in enumerate(rule.when):
            target = when_target(c.key)
            if target is None:
                continue
            for v in (*c.values, *c.not_values):
                try:
                    target[1](c.key, v, False)
                except Untranslatable:
                    yield _bad_value(cfg, spec, f"{path}.when[{j}]", v)


def _bad_value(cfg: Config, spec: AuthorizationPolicySpec, path: str, value: str) -> Message:
    effect = (
        "the rule is dropped (it can never allow)"
        if spec.action == "ALLOW"
        else "the value is ignored (the rule matches more)"
    )
    return _msg(INVALID_AUTHZ, cfg, path, f"{value!r} is not valid here: {effect}")


def _peer_authentications(push: PushContext) -> Iterator[Message]:
    root = push.mesh.root_namespace
    wide: dict[str, list[Config]] = {}
    for cfg in push.configs(kinds.PEER_AUTHENTICATION).values():
        spec: PeerAuthenticationSpec = cfg.spec
        selected = spec.selector is not None and bool(spec.selector.match_labels)
        if selected and cfg.namespace == root:
            yield _msg(
                UNSUPPORTED,
                cfg,
                "spec.selector",
                f"a PeerAuthentication with a selector in the root namespace {root} is "
                "ignored (as in Istio); put it in the workload's namespace",
            )
        if not selected:
            wide.setdefault(cfg.namespace, []).append(cfg)
            if spec.port_level_mtls:
                yield _msg(
                    UNSUPPORTED,
                    cfg,
                    "spec.portLevelMtls",
                    "portLevelMtls needs a workload selector (as in Istio); it is ignored",
                )
    for ns, configs in wide.items():
        if len(configs) < 2:
            continue
        ordered = sorted(
            configs,
            key=lambda c: (
                c.creation_timestamp.timestamp() if c.creation_timestamp else 0.0,
                c.name,
            ),
        )
        scope = "mesh" if ns == root else f"namespace {ns}"
        text = (
            f"{len(configs)} PeerAuthentications without selector apply to the {scope}; "
            f"only the oldest, {ordered[0].name}, is used"
        )
        for cfg in ordered:
            yield _msg(CONFLICTING_PEER_AUTHN, cfg, "spec", text)


def _sidecar_ingress_tls(cfg: Config, path: str, tls: ServerTLSSettings) -> Iterator[Message]:
    if tls.mode not in ("SIMPLE", "MUTUAL") or tls.credential_name:
        yield _msg(
            UNSUPPORTED,
            cfg,
            path,
            "Sidecar ingress TLS supports SIMPLE and MUTUAL with certificate files; "
            "this port uses mesh mTLS (PeerAuthentication) instead",
        )
        return
    missing = [
        name
        for name, value in (
            ("serverCertificate", tls.server_certificate),
            ("privateKey", tls.private_key),
            ("caCertificates", tls.ca_certificates if tls.mode == "MUTUAL" else "x"),
        )
        if not value
    ]
    if missing:
        yield _msg(
            REFERENCED_RESOURCE_NOT_FOUND,
            cfg,
            path,
            f"{tls.mode} needs {', '.join(missing)}; this port uses mesh mTLS "
            "(PeerAuthentication) instead",
        )
