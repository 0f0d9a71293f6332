"""Generated resources, serialized once and shared by every proxy with the same scope.

Entries are keyed by the push context that produced them, so a new push never sees
stale output; only the newest few contexts are kept. ClusterLoadAssignments of hosts
whose endpoints did not change are carried over to the next context as they are.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")

KEEP_CONTEXTS = 3


class XdsCache:
    def __init__(self) -> None:
        self._by_context: OrderedDict[str, dict[Hashable, object]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _bucket(self, version: str) -> dict[Hashable, object]:
        bucket = self._by_context.get(version)
        if bucket is None:
            bucket = self._by_context[version] = {}
            while len(self._by_context) > KEEP_CONTEXTS:
                self._by_context.popitem(last=False)
        return bucket

    def get(self, version: str, key: Hashable) -> object | None:
        """The cached value, or None; never builds."""
        bucket = self._by_context.get(version)
        return None if bucket is None else bucket.get(key)

    def get_or_build(self, version: str, key: Hashable, build: Callable[[], T]) -> T:
        bucket = self._bucket(version)
        try:
            value = bucket[key]
            self.hits += 1
            return value  # type: ignore[return-value]
        except KeyError:
            self.misses += 1
            value = bucket[key] = build()
            return value

    def carry_over(
        self, old_version: str, new_version: str, keep: Callable[[Hashable], bool]
    ) -> None:
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
