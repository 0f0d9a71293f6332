"""Generated resources, serialized once and shared by every proxy with the same scope.

Entries are keyed by the push context that produced them, so a new push never sees
stale output; only the newest few contexts are kept. ClusterLoadAssignments of hosts
whose endpoints did not change are carried over to the next context as they are.

Istio's XdsCache is one LRU keyed by strings built from each resource's dependencies;
here each kind of entry has its own cache with a typed key (the frozen dataclasses
below), so a key is built and read in one place and never decoded from a tuple.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

KEEP_CONTEXTS = 3
# Entries per push context and cache. Keys come from proxies' scopes and subscribed
# names, so they are bounded by the mesh (and names by what exists), but a limit
# keeps a mistake from becoming unbounded memory: past it, values are built and not kept.
MAX_ENTRIES = 500_000
# Serialized clusters, virtual hosts and route configurations kept across pushes
# (ResourceCache): a mesh of 1,000 services with DestinationRule subsets needs
# ~5,000 clusters and as many virtual hosts per DNS domain they are seen from.
MAX_RESOURCES = 100_000


class XdsCache(Generic[K, V]):
    """Values of type V by key K, per push context version."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._by_context: OrderedDict[str, dict[K, V]] = OrderedDict()
        self._max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        """Entries held, over all kept contexts."""
        return sum(len(b) for b in self._by_context.values())

    def _bucket(self, version: str) -> dict[K, V]:
        bucket = self._by_context.get(version)
        if bucket is None:
            bucket = self._by_context[version] = {}
            while len(self._by_context) > KEEP_CONTEXTS:
                self._by_context.popitem(last=False)
        return bucket

    def get(self, version: str, key: K) -> V | None:
        """The cached value, or None; never builds."""
        bucket = self._by_context.get(version)
        return None if bucket is None else bucket.get(key)

    def get_or_build(self, version: str, key: K, build: Callable[[], V]) -> V:
        bucket = self._bucket(version)
        try:
            value = bucket[key]
            self.hits += 1
            return value
        except KeyError:
            self.misses += 1
            value = build()
            if len(bucket) < self._max_entries:
                bucket[key] = value
            return value

    def put(self, version: str, key: K, value: V) -> None:
        bucket = self._bucket(version)
        if len(bucket) < self._max_entries:
            bucket[key] = value

    def carry_over(self, old_version: str, new_version: str, keep: Callable[[K], bool]) -> None:
        """Copy entries for which `keep(key)` holds from one context to the next."""
        old = self._by_context.get(old_version)
        if not old:
            return
        new = self._bucket(new_version)
        for key, value in old.items():
            if key not in new and keep(key):
                new[key] = value

    def clear(self) -> None:
        self._by_context.clear()


# --- keys ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ScopeKey:
    """What a proxy's CDS/LDS/RDS output depends on: equal keys, identical output."""

    proxy_type: str
    sidecar_scope: Hashable
    # (hostname, service port, endpoint port) of the services the proxy is part of.
    instances: tuple[tuple[str, int, int], ...]
    # The proxy's own IPs where listeners bind to them, else ().
    ips: tuple[str, ...]
    # IPv6 or not, per address: DNS lookup family and passthrough source.
    families: tuple[bool, ...]
    interception_mode: str
    dns_domain: str
    # Mesh mTLS (SDS references) only for proxies beside the agent.
    has_sds: bool


@dataclass(frozen=True, slots=True)
class WholeKey:
    """A whole CDS or LDS answer: `type_url` for the scope plus what else it depends on."""

    type_url: str
    scope: ScopeKey
    extra: Hashable = None


@dataclass(frozen=True, slots=True)
class RouteScopeKey:
    """All route configurations of one scope (with its sourceLabels values)."""

    scope: ScopeKey
    source_labels: Hashable


@dataclass(frozen=True, slots=True)
class RouteShareKey:
    """One route configuration as every namespace with the same view sees it (its
    services all outside the proxy's namespace, so no short domains)."""

    view: ScopeKey
    source_labels: Hashable
    # The cluster's DNS suffix (`cluster.local` of `NS.svc.cluster.local`).
    dns_suffix: str
    name: str


@dataclass(frozen=True, slots=True)
class RoutesOutKey:
    """The RDS answer for one subscription (None: every route of the scope)."""

    scope: RouteScopeKey
    names: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class NamespaceKey:
    """A per-namespace fact of the push (e.g. label names sourceLabels look at)."""

    namespace: str


@dataclass(frozen=True, slots=True)
class ScopeNamespaceKey:
    """A fact of a scope as seen from one namespace (CDS depending on locality)."""

    scope: ScopeKey
    namespace: str


@dataclass(frozen=True, slots=True)
class EdsKey:
    """One ClusterLoadAssignment; proxies with equal keys get the same one.

    `rule` and `where` are the translator's: the DestinationRule identity where a
    subset or locality setting applies, and the locality (or failover priority) part.
    """

    cluster_name: str
    rule: Hashable = None
    where: Hashable = None

    @staticmethod
    def of(translator_key: Hashable) -> EdsKey:
        """From `translators.endpoints.eds_cache_entry`'s `("eds", name, rule, where)`."""
        assert isinstance(translator_key, tuple) and translator_key[0] == "eds"
        return EdsKey(*translator_key[1:])

    @property
    def uses_proxy_labels(self) -> bool:
        """Failover priority depends on the proxy's labels, not only namespace/locality."""
        return isinstance(self.where, tuple) and bool(self.where) and self.where[0] == "priority"


@dataclass(frozen=True, slots=True)
class EdsViewKey:
    """Proxies of one namespace and locality see the same assignments (unless labels)."""

    namespace: str
    locality: Hashable


@dataclass(frozen=True, slots=True)
class EdsOutKey:
    """The EDS answer for one subscription (and, for a push, the changed hosts)."""

    view: EdsViewKey
    names: frozenset[str]
    hosts: frozenset[str] | None


class ResourceCache(Generic[K, V]):
    """Serialized resources keyed by exactly what they depend on, across push contexts.

    Istio's XdsCache: an entry lives as long as its key can recur, whatever the push
    context, so a new context (a DestinationRule change, say) rebuilds only the
    resources whose inputs changed: their keys are new, every other key hits. Keys
    never name a proxy or a namespace unless the resource depends on it, so scopes
    that see the same services share every entry. Least recently used entries go
    first past `max_entries`: keys of old revisions are never asked for again.
    """

    def __init__(self, max_entries: int) -> None:
        self._entries: OrderedDict[K, V] = OrderedDict()
        self._max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_build(self, key: K, build: Callable[[], V]) -> V:
        entries = self._entries
        value = entries.get(key)
        if value is not None:
            self.hits += 1
            entries.move_to_end(key)
            return value
        self.misses += 1
        value = build()
        entries[key] = value
        if len(entries) > self._max_entries:
            # Drop a tenth at once: amortized, and a burst of new keys (a change to a
            # mesh-wide setting) does not pay one eviction per insert.
            drop = max(1, self._max_entries // 10)
            for _ in range(drop):
                entries.popitem(last=False)
            self.evictions += drop
        return value

    def clear(self) -> None:
        self._entries.clear()
