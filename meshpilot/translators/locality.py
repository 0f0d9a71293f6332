"""Locality load balancing on endpoint groups: Istio's loadbalancer.go.

Endpoints are grouped by locality. A LocalityLbSetting then either
- `distribute`s: the first rule whose `from` matches the proxy's locality sets each
  group's weight (Envoy's locality-weighted LB), dropping groups no `to` entry matches; or
- fails over, only when outlier detection is on for the cluster (Envoy never moves to a
  lower priority otherwise): priorities relative to the proxy's locality (same
  region/zone/subzone 0, region/zone 1, region 2, other 3; a `failover` rule from the
  proxy's region demotes regions other than its `to` to 4), or by `failoverPriority`
  labels shared with the proxy. Priorities are then renumbered 0..N without gaps.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from meshpilot.api.networking import LocalityLbSetting
from meshpilot.model.proxy import Locality, Proxy
from meshpilot.model.service import Endpoint

# Envoy requires weights >= 1; a locality's sum must fit in uint32.
MAX_ENDPOINT_WEIGHT = 2**24


@dataclass(slots=True)
class LocalityGroup:
    """Endpoints of one locality (and one failover priority), with Envoy's weight."""

    locality: Locality
    endpoints: list[Endpoint]
    weight: int
    priority: int = 0


def endpoint_weight(ep: Endpoint) -> int:
    return min(max(ep.weight, 1), MAX_ENDPOINT_WEIGHT)


def group_by_locality(endpoints: Iterable[Endpoint]) -> list[LocalityGroup]:
    """Groups sorted by locality, endpoints sorted by address: stable output."""
    by_locality: dict[str, list[Endpoint]] = {}
    for ep in endpoints:
        by_locality.setdefault(ep.locality, []).append(ep)
    out = []
    for text in sorted(by_locality):
        group = sorted(by_locality[text], key=lambda e: (e.address, e.port))
        out.append(
            LocalityGroup(Locality.parse(text), group, sum(endpoint_weight(e) for e in group))
        )
    return out


def locality_match(proxy: Locality, rule: str) -> bool:
    """Istio's LocalityMatch: `rule` (with `*` wildcards) equals or contains `proxy`."""
    region, zone, subzone = _split(rule)
    return (
        (region == "*" or proxy.region == region)
        and (zone in ("*", "") or proxy.zone == zone)
        and (subzone in ("*", "") or proxy.subzone == subzone)
    )


def _split(text: str) -> tuple[str, str, str]:
    region, zone, subzone = [*text.split("/"), "", ""][:3]
    return region, zone, subzone


def lb_priority(proxy: Locality, ep: Locality) -> int:
    if proxy.region != ep.region:
        return 3
    if proxy.zone != ep.zone:
        return 2
    return 0 if proxy.subzone == ep.subzone else 1


# --- what a CLA depends on ----------------------------------------------------------------


def locality_key(
    setting: LocalityLbSetting | None, enable_failover: bool, proxy: Proxy
) -> Hashable:
    """The part of `proxy` that changes the result of `apply_locality_lb`; None if nothing
    does, so that every proxy shares the same ClusterLoadAssignment."""
    if setting is None:
        return None
    if setting.distribute:
        return ("distribute", _distribute_index(setting, proxy.locality))
    if not enable_failover:
        return None
    loc = proxy.locality
    if setting.failover_priority:
        labels = _priority_labels(setting.failover_priority, proxy.labels)
        where = (loc.region, loc.zone, loc.subzone) if setting.failover else None
        return ("priority", bool(proxy.labels), labels, where)
    return ("failover", loc.region, loc.zone, loc.subzone)


def _distribute_index(setting: LocalityLbSetting, proxy: Locality) -> int:
    for i, rule in enumerate(setting.distribute):
        if locality_match(proxy, rule.from_):
            return i
    return -1


def _priority_labels(
    priorities: list[str], proxy_labels: Mapping[str, str]
) -> tuple[tuple[str, str | None], ...]:
    """(label, value the proxy is compared with) per failoverPriority entry; `label=value`
    fixes the value instead of reading the proxy's label."""
    out: list[tuple[str, str | None]] = []
    for entry in priorities:
        name, sep, value = entry.partition("=")
        out.append((name, value if sep else proxy_labels.get(name)))
    return tuple(out)


# --- application --------------------------------------------------------------------------


def apply_locality_lb(
    groups: list[LocalityGroup],
    proxy: Proxy,
    setting: LocalityLbSetting | None,
    enable_failover: bool,
) -> list[LocalityGroup]:
    """Istio's ApplyLocalityLoadBalancer on groups (which it may split, reweight, drop)."""
    if setting is None or not groups:
        return groups
    if setting.distribute:
        return _apply_distribute(groups, proxy.locality, setting)
    if not enable_failover:
        return groups
    if setting.failover_priority:
        groups = _apply_failover_priority(groups, proxy.labels, setting.failover_priority)
        if setting.failover:
            _apply_failover(groups, proxy.locality, setting)
        return groups
    _apply_failover(groups, proxy.locality, setting)
    return groups


def _apply_distribute(
    groups: list[LocalityGroup], proxy: Locality, setting: LocalityLbSetting
) -> list[LocalityGroup]:
    index = _distribute_index(setting, proxy)
    if index < 0:
        return groups
    rule = setting.distribute[index]
    unmatched = set(range(len(groups)))
    for target, weight in rule.to.items():
        matched = [i for i in sorted(unmatched) if locality_match(groups[i].locality, target)]
        total = sum(groups[i].weight for i in matched)
        for i in matched:
            unmatched.discard(i)
            # A wildcard `to` shares its weight among the localities it matches, in
            # proportion to their own weights (Istio rounds up).
            share = groups[i].weight * weight / total if total else 0
            if share > 0:
                groups[i].weight = math.ceil(share)
    # Localities no `to` entry names get no traffic (Istio empties them; dropping them
    # is the same to Envoy and keeps the assignment small).
    return [g for i, g in enumerate(groups) if i not in unmatched]


def _apply_failover(
    groups: list[LocalityGroup], proxy: Locality, setting: LocalityLbSetting
) -> None:
    for g in groups:
        priority = lb_priority(proxy, g.locality)
        if priority == 3:
            for rule in setting.failover:
                if rule.from_ == proxy.region:
                    if g.locality.region != rule.to:
                        priority = 4
                    break
        # Keeps failoverPriority's order first: at most 5 locality levels per level.
        g.priority = g.priority * 5 + priority
    _renumber(groups)


def _apply_failover_priority(
    groups: list[LocalityGroup], proxy_labels: Mapping[str, str], priorities: list[str]
) -> list[LocalityGroup]:
    if not proxy_labels:
        return groups
    wanted = _priority_labels(priorities, proxy_labels)
    lowest = len(wanted)
    out: list[LocalityGroup] = []
    for g in groups:
        by_priority: dict[int, list[Endpoint]] = {}
        for ep in g.endpoints:
            priority = 0
            for j, (name, value) in enumerate(wanted):
                if ep.labels.get(name) != value:
                    # The earlier the first mismatching label, the lower the priority.
                    priority = lowest - j
                    break
            by_priority.setdefault(priority, []).append(ep)
        for priority in sorted(by_priority):
            eps = by_priority[priority]
            out.append(
                LocalityGroup(
                    g.locality, eps, sum(endpoint_weight(e) for e in eps), priority=priority
                )
            )
    _renumber(out)
    return out


def _renumber(groups: list[LocalityGroup]) -> None:
    """Envoy wants priorities 0..N without gaps."""
    rank = {p: i for i, p in enumerate(sorted({g.priority for g in groups}))}
    for g in groups:
        g.priority = rank[g.priority]
