"""What an informer follows and what its handlers hear: the resource, typed events."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


@dataclass(frozen=True, slots=True)
class Resource:
    """Which collection an informer follows: group/version/plural and the kind's name."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def label(self) -> str:
        """`plural.group` (just `plural` for the core group), as kubectl names it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def collection_path(self, namespace: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if namespace and self.namespaced:
            base += f"/namespaces/{namespace}"
        return f"{base}/{self.plural}"


class EventType(StrEnum):
    ADDED = "ADDED"
    MODIFIED = "MODIFIED"
    DELETED = "DELETED"


ObjectKey = tuple[str, str]
"""(namespace, name); the namespace is "" for cluster-scoped objects."""


@dataclass(frozen=True, slots=True)
class InformerEvent:
    """One change of the cache. `obj` is the new state (for DELETED, the last known
    one); `old` the state it replaced, for MODIFIED."""

    type: EventType
    key: ObjectKey
    obj: Mapping[str, Any]
    old: Mapping[str, Any] | None = None


Handler = Callable[[InformerEvent], None]
