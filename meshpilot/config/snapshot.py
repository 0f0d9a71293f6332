"""The store snapshot: what a push reads of the config store.

Istio's `model.ConfigStore` interface lets the push context list configs by kind
without knowing where they came from (Kubernetes CRDs, files, MCP). meshpilot's
snapshot is an immutable mapping of kind to objects, built by the store
(`discovery/store.py`) and read by `model/`; neither needs the other's code.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from meshpilot.config.objects import Config, ConfigKey


@dataclass(frozen=True, slots=True)
class StoreSnapshot:
    """An immutable view: configs by kind, then by key. Cheap to share with a push."""

    by_kind: Mapping[str, Mapping[ConfigKey, Config]]
    generation: int

    def of_kind(self, kind: str) -> Mapping[ConfigKey, Config]:
        return self.by_kind.get(kind, MappingProxyType({}))

    def get(self, key: ConfigKey) -> Config | None:
        return self.of_kind(key.kind).get(key)

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_kind.values())
