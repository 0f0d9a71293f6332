"""Config objects as they sit in the store: a key, metadata and a typed spec."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True, order=True)
class ConfigKey:
    """Identity of one config object: Istio's (kind, namespace, name)."""

    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class Config:
    """One validated object. `spec` is the kind's pydantic model instance."""

    key: ConfigKey
    spec: Any
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    creation_timestamp: datetime | None = None
    # Where it came from, for error messages and /debug/configz: "file.yaml#2".
    origin: str = ""
    # Hash of the normalized content: equal revisions mean nothing changed.
    revision: str = ""

    @property
    def kind(self) -> str:
        return self.key.kind

    @property
    def namespace(self) -> str:
        return self.key.namespace

    @property
    def name(self) -> str:
        return self.key.name


def age_key(cfg: Config) -> tuple[float, str, str]:
    """Istio's precedence among conflicting configs: oldest creationTimestamp first,
    then namespace and name, so the winner never depends on load order."""
    ts = cfg.creation_timestamp.timestamp() if cfg.creation_timestamp else 0.0
    return (ts, cfg.namespace, cfg.name)


def oldest_first(configs: Iterable[Config]) -> list[Config]:
    return sorted(configs, key=age_key)
