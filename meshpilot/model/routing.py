"""VirtualService and DestinationRule lookup with Istio's visibility and precedence."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshpilot.api.networking import DestinationRuleSpec, VirtualServiceSpec
from meshpilot.config import Config, age_key
from meshpilot.model.sidecar_scope import host_matches

MESH_GATEWAY = "mesh"


def resolve_host(host: str, namespace: str, domain_suffix: str) -> str:
    """Istio's short-name rule: a name without dots lives in `namespace`."""
    if host == "*" or "." in host:
        return host
    return f"{host}.{namespace}.svc.{domain_suffix}"


def exported_to(export_to: Iterable[str], owner_ns: str, namespace: str) -> bool:
    values = list(export_to) or ["*"]
    if "*" in values or namespace in values:
        return True
    return "." in values and owner_ns == namespace


@dataclass(frozen=True, slots=True)
class ResolvedVirtualService:
    config: Config
    hosts: tuple[str, ...]  # FQDNs or wildcards

    @property
    def spec(self) -> VirtualServiceSpec:
        spec: VirtualServiceSpec = self.config.spec
        return spec


@dataclass(frozen=True, slots=True)
class ResolvedDestinationRule:
    config: Config
    host: str  # FQDN or wildcard

    @property
    def spec(self) -> DestinationRuleSpec:
        spec: DestinationRuleSpec = self.config.spec
        return spec


@dataclass(frozen=True, slots=True)
class Conflict:
    """A host claimed by several VirtualServices or DestinationRules: who won, who lost."""

    kind: str
    host: str
    winner: Config
    losers: tuple[Config, ...]

    def message(self) -> str:
        lost = ", ".join(f"{c.namespace}/{c.name}" for c in self.losers)
        return (
            f"{self.kind}s {lost} and {self.winner.namespace}/{self.winner.name} all define "
            f"host {self.host}; only {self.winner.namespace}/{self.winner.name} (the oldest) "
            "is used"
        )


def resolve_virtual_services(
    configs: Iterable[Config], domain_suffix: str
) -> list[ResolvedVirtualService]:
    out = []
    for cfg in sorted(configs, key=age_key):
        spec: VirtualServiceSpec = cfg.spec
        hosts = tuple(resolve_host(h, cfg.namespace, domain_suffix) for h in spec.hosts)
        out.append(ResolvedVirtualService(cfg, hosts))
    return out


def applies_to_mesh(vs: ResolvedVirtualService) -> bool:
    gws = vs.spec.gateways
    return not gws or MESH_GATEWAY in gws


class VirtualServiceIndex:
    """Sidecar VirtualServices visible from one namespace, by host, oldest winning."""

    def __init__(self, resolved: Iterable[ResolvedVirtualService], namespace: str) -> None:
        self.by_host: dict[str, ResolvedVirtualService] = {}
        self.conflicts: list[Conflict] = []
        losers: dict[str, list[Config]] = {}
        for vs in resolved:
            if not applies_to_mesh(vs):
                continue
            if not exported_to(vs.spec.export_to, vs.config.namespace, namespace):
                continue
            for host in vs.hosts:
                if host in self.by_host:
                    losers.setdefault(host, []).append(vs.config)
                else:
                    self.by_host[host] = vs
        for host, lost in losers.items():
            self.conflicts.append(
                Conflict("VirtualService", host, self.by_host[host].config, tuple(lost))
            )
        self._wildcards = sorted(
            (h for h in self.by_host if h.startswith("*")), key=len, reverse=True
        )

    def for_host(self, hostname: str) -> ResolvedVirtualService | None:
        """Exact host first, then the most specific wildcard."""
        vs = self.by_host.get(hostname)
        if vs is not None:
            return vs
        for pattern in self._wildcards:
            if host_matches(pattern, hostname):
                return self.by_host[pattern]
        return None


class DestinationRuleIndex:
    """DestinationRules by namespace and host; Istio's lookup order for a client."""

    def __init__(self, configs: Iterable[Config], domain_suffix: str, root_namespace: str) -> None:
        self.root_namespace = root_namespace
        self.by_ns: dict[str, dict[str, ResolvedDestinationRule]] = {}
        # Wildcard hosts apart, most specific first: a lookup must not scan every rule.
        self._wildcards: dict[str, list[ResolvedDestinationRule]] = {}
        self.conflicts: list[Conflict] = []
        losers: dict[tuple[str, str], list[Config]] = {}
        for cfg in sorted(configs, key=age_key):
            spec: DestinationRuleSpec = cfg.spec
            if spec.workload_selector is not None and spec.workload_selector.labels:
                # Workload-scoped rules apply to the selected proxies' own outbound
                # traffic only; they are kept apart so they never leak mesh-wide.
                continue
            host = resolve_host(spec.host, cfg.namespace, domain_suffix)
            rules = self.by_ns.setdefault(cfg.namespace, {})
            if host in rules:
                losers.setdefault((cfg.namespace, host), []).append(cfg)
            else:
                rules[host] = ResolvedDestinationRule(cfg, host)
        for (ns, host), lost in losers.items():
            self.conflicts.append(
                Conflict("DestinationRule", host, self.by_ns[ns][host].config, tuple(lost))
            )
        for ns, rules in self.by_ns.items():
            wild = [dr for host, dr in rules.items() if host.startswith("*")]
            self._wildcards[ns] = sorted(wild, key=lambda dr: len(dr.host), reverse=True)

    def lookup(
        self, client_ns: str, hostname: str, service_ns: str
    ) -> ResolvedDestinationRule | None:
        """Client namespace, then the service's namespace, then the root namespace."""
        for ns in dict.fromkeys((client_ns, service_ns, self.root_namespace)):
            rules = self.by_ns.get(ns)
            if not rules:
                continue
            dr = rules.get(hostname) or next(
                (w for w in self._wildcards.get(ns, ()) if host_matches(w.host, hostname)), None
            )
            if dr is not None and exported_to(dr.spec.export_to, dr.config.namespace, client_ns):
                return dr
        return None
