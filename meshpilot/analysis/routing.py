"""Analysis of VirtualServices and DestinationRules: references to hosts, subsets,
ports and gateways that do not exist, rules that can never match, weights, and
conflicts between objects for one host (where meshpilot keeps the oldest, and Istio
merges DestinationRules)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from meshpilot.analysis.messages import (
    CONFLICTING_DESTINATION_RULES,
    CONFLICTING_MESH_VS_HOSTS,
    PORT_SELECTOR_REQUIRED,
    REFERENCED_RESOURCE_NOT_FOUND,
    SUBSET_SELECTS_NO_PODS,
    UNREACHABLE_RULE,
    UNSUPPORTED,
    WEIGHTS_NOT_100,
    ZERO_TOTAL_WEIGHT,
    Message,
    msg,
)
from meshpilot.api.networking import (
    Destination,
    HTTPRoute,
    L4MatchAttributes,
    TCPRoute,
    TLSMatchAttributes,
    TLSRoute,
    VirtualServiceSpec,
)
from meshpilot.config import Config, kinds
from meshpilot.model.push_context import PushContext
from meshpilot.model.routing import MESH_GATEWAY, Conflict, ResolvedVirtualService
from meshpilot.model.service import Resolution, labels_match

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


# --- VirtualServices --------------------------------------------------------------------


def _destinations(spec: VirtualServiceSpec) -> Iterator[tuple[str, Destination, str]]:
    """(field path, destination, what happens to its traffic when its cluster does not
    exist) of every reference, after the translation's rules (translators/http_route.py
    and l4_route.py)."""
    for i, rule in enumerate(spec.http):
        weights = [rd.weight for rd in rule.route]
        for j, rd in enumerate(rule.route):
            effect = _http_effect(rd.weight, weights)
            yield f"spec.http[{i}].route[{j}].destination", rd.destination, effect
        mirror_effect = "nothing is mirrored to it"
        if rule.mirror is not None:
            yield f"spec.http[{i}].mirror", rule.mirror, mirror_effect
        for j, m in enumerate(rule.mirrors):
            yield f"spec.http[{i}].mirrors[{j}].destination", m.destination, mirror_effect
    l4_by_proto: tuple[tuple[str, Sequence[TCPRoute | TLSRoute]], ...] = (
        ("tcp", spec.tcp),
        ("tls", spec.tls),
    )
    for proto, l4_rules in l4_by_proto:
        for i, l4 in enumerate(l4_rules):
            effect = (
                "it is left out of the split (its share goes to the other destinations; "
                "connections go to BlackHoleCluster when none is left)"
                if len(l4.route) > 1
                else "connections go to BlackHoleCluster"
            )
            for j, l4_dest in enumerate(l4.route):
                yield f"spec.{proto}[{i}].route[{j}].destination", l4_dest.destination, effect


def _http_effect(weight: int, weights: list[int]) -> str:
    if len(weights) < 2:
        return "every request this rule routes gets 503"
    total = sum(weights)
    if weight == 0 or total == 0:
        return "it has weight 0 and gets no requests"
    share = f"{round(100 * weight / total, 1):g}%"
    return f"its {share} share of requests (weight {weight} of {total}) gets 503 (no cluster)"


def virtual_service(push: PushContext, vs: ResolvedVirtualService) -> Iterator[Message]:
    cfg = vs.config
    spec = vs.spec
    yield from _gateways(push, cfg, spec.gateways, "spec.gateways")
    for path, dest, effect in _destinations(spec):
        yield from _destination(push, cfg, path, dest, effect)
    for i, rule in enumerate(spec.http):
        yield from _http_rule(cfg, i, rule)
        if not rule.match and i < len(spec.http) - 1:
            yield msg(
                UNREACHABLE_RULE,
                cfg,
                f"spec.http[{i + 1}]",
                f"VirtualService rule #{i + 1} not used (only the last rule can have no "
                f"matches: rule #{i} matches every request).",
            )
        for j, m in enumerate(rule.match):
            yield from _gateways(push, cfg, m.gateways, f"spec.http[{i}].match[{j}].gateways")
    l4_by_proto: tuple[tuple[str, Sequence[TCPRoute | TLSRoute]], ...] = (
        ("tcp", spec.tcp),
        ("tls", spec.tls),
    )
    for proto, rules in l4_by_proto:
        for i, l4 in enumerate(rules):
            path = f"spec.{proto}[{i}]"
            yield from _weights(cfg, path, [rd.weight for rd in l4.route])
            matches: Sequence[L4MatchAttributes | TLSMatchAttributes] = l4.match
            for j, l4_match in enumerate(matches):
                if l4_match.destination_subnets:
                    yield msg(
                        UNSUPPORTED,
                        cfg,
                        f"{path}.match[{j}].destinationSubnets",
                        "destinationSubnets is not supported by meshpilot; this match is ignored",
                    )


def _http_rule(cfg: Config, i: int, rule: HTTPRoute) -> Iterator[Message]:
    path = f"spec.http[{i}]"
    if rule.delegate is not None:
        yield msg(
            UNSUPPORTED,
            cfg,
            f"{path}.delegate",
            "delegate is not supported by meshpilot; this rule is ignored",
        )
    if rule.redirect is not None and rule.redirect.redirect_code not in _REDIRECT_CODES:
        yield msg(
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
            yield msg(
                UNSUPPORTED,
                cfg,
                f"{path}.fault.delay",
                "only fixedDelay is supported (as in Istio); this delay is ignored",
            )
        abort = fault.abort
        if abort is not None and abort.http_status is None:
            grpc = (abort.grpc_status or "").upper()
            if grpc not in _GRPC_STATUS_NAMES:
                yield msg(
                    UNSUPPORTED,
                    cfg,
                    f"{path}.fault.abort",
                    "only httpStatus and known grpcStatus names are supported (as in "
                    "Istio); this abort is ignored",
                )


def _weights(cfg: Config, path: str, weights: list[int]) -> Iterator[Message]:
    if len(weights) > 1 and not any(weights):
        yield msg(
            ZERO_TOTAL_WEIGHT,
            cfg,
            f"{path}.route",
            f"all {len(weights)} destinations have weight 0, so none gets traffic: "
            "requests get 503 (HTTP) or connections go to BlackHoleCluster (TCP/TLS)",
        )
    elif len(weights) > 1 and sum(weights) != 100:
        total = sum(weights)
        shares = ", ".join(f"{round(100 * w / total, 1):g}%" for w in weights)
        yield msg(
            WEIGHTS_NOT_100,
            cfg,
            f"{path}.route",
            f"the weights of route {path} ({', '.join(map(str, weights))}) sum to {total}, "
            f"not 100; accepted as in Istio: each destination gets its weight divided by "
            f"{total} ({shares})",
        )


def _destination(
    push: PushContext, cfg: Config, path: str, dest: Destination, effect: str
) -> Iterator[Message]:
    host = push.resolve_host(dest.host, cfg.namespace)
    svc = push.services.get(host)
    if svc is None:
        short = (
            f" ({dest.host!r} is {host} from namespace {cfg.namespace})"
            if host != dest.host
            else ""
        )
        yield msg(
            REFERENCED_RESOURCE_NOT_FOUND,
            cfg,
            f"{path}.host",
            f"Referenced host not found: {host!r}{short}; no service or ServiceEntry has "
            f"this host, so its cluster does not exist: {effect}",
        )
        return
    if dest.port is not None and svc.port(dest.port.number) is None:
        ports = ", ".join(str(p.port) for p in svc.ports)
        yield msg(
            REFERENCED_RESOURCE_NOT_FOUND,
            cfg,
            f"{path}.port.number",
            f"Referenced host:port not found: '{host}:{dest.port.number}'; the service's "
            f"ports are {ports}, so its cluster does not exist: {effect}",
        )
    if dest.port is None and len(svc.ports) > 1:
        numbers = [p.port for p in svc.ports]
        yield msg(
            PORT_SELECTOR_REQUIRED,
            cfg,
            f"{path}.port",
            f"This VirtualService routes to a service {host!r} that exposes multiple ports "
            f"{numbers}. Specifying a port in the destination is required to disambiguate "
            "(meshpilot uses the port the request came in on).",
        )
    if dest.subset:
        dr = push.destination_rule(cfg.namespace, svc)
        subsets = [s.name for s in dr.spec.subsets] if dr is not None else []
        if dest.subset not in subsets:
            where = (
                f"DestinationRule {dr.config.namespace}/{dr.config.name} defines "
                f"{', '.join(subsets) or 'no subsets'} but not {dest.subset}"
                if dr is not None
                else f"no DestinationRule for {host} applies in namespace {cfg.namespace}"
            )
            yield msg(
                REFERENCED_RESOURCE_NOT_FOUND,
                cfg,
                f"{path}.subset",
                f"Referenced host+subset in destinationrule not found: "
                f"'{host}+{dest.subset}' ({where}), so its cluster does not exist: {effect}",
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
            yield msg(
                REFERENCED_RESOURCE_NOT_FOUND,
                cfg,
                f"{path}[{i}]",
                f"Referenced gateway not found: {f'{ns}/{name}'!r}",
            )


def virtual_service_conflicts(push: PushContext) -> Iterator[Message]:
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
        yield msg(CONFLICTING_MESH_VS_HOSTS, cfg, "spec.hosts", text)


def _namespaces(push: PushContext) -> set[str]:
    out = {svc.namespace for svc in push.services_sorted}
    for by_key in push.snapshot.by_kind.values():
        out.update(k.namespace for k in by_key)
    return out


# --- DestinationRules -------------------------------------------------------------------


def destination_rule_conflicts(push: PushContext) -> Iterator[Message]:
    for conflict in push.destination_rules.conflicts:
        involved = (conflict.winner, *conflict.losers)
        names = ", ".join(f"{c.namespace}/{c.name}" for c in involved)
        winner = f"{conflict.winner.namespace}/{conflict.winner.name}"
        text = (
            f"The DestinationRules {names} define the same host {conflict.host}; meshpilot "
            f"uses {winner} (the oldest, then by name) and ignores the others (Istio would "
            "merge their subsets). Merge them into a single resource."
        )
        for cfg in involved:
            yield msg(CONFLICTING_DESTINATION_RULES, cfg, "spec.host", text)


def subsets_selecting_no_endpoints(push: PushContext, hosts: Iterable[str]) -> Iterator[Message]:
    """IST0173 for the DestinationRules of `hosts`: the one DestinationRule finding that
    depends on endpoints."""
    by_ns = push.destination_rules.by_ns
    for host in hosts:
        svc = push.services.get(host)
        if svc is None or svc.resolution is not Resolution.CLIENT_SIDE_LB:
            continue  # DNS hosts: endpoints have no labels to select
        rules = [per_ns[host] for per_ns in by_ns.values() if host in per_ns]
        if not rules:
            continue
        endpoints = [ep for per_port in push.endpoints.get(host, {}).values() for ep in per_port]
        for dr in rules:
            for i, subset in enumerate(dr.spec.subsets):
                if not any(labels_match(subset.labels, ep.labels) for ep in endpoints):
                    yield msg(
                        SUBSET_SELECTS_NO_PODS,
                        dr.config,
                        f"spec.subsets[{i}]",
                        f"The Subset {subset.name} defined in the DestinationRule does not "
                        f"select any pods (labels {dict(subset.labels)} match no endpoint "
                        f"of {svc.hostname}). Which may lead to 503 UH (NoHealthyUpstream).",
                    )
