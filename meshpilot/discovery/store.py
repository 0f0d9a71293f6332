"""The config store: every source's objects in one place, with the last good version kept.

Sources hand over what one origin (a file, a watched object) holds now. The store keeps,
per origin, the objects that validated; an object that fails keeps its last good
version, and a file that fails to parse keeps all of its last good objects. Listeners
hear which keys changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import structlog

from meshpilot.api.errors import ConfigError
from meshpilot.model.config import Config, ConfigKey
from meshpilot.monitoring import metrics

log = structlog.get_logger(__name__)

ChangeListener = Callable[[frozenset[ConfigKey]], None]


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


@dataclass(slots=True)
class _Origin:
    configs: dict[ConfigKey, Config] = field(default_factory=dict)
    errors: list[ConfigError] = field(default_factory=list)


class ConfigStore:
    def __init__(self) -> None:
        self._origins: dict[str, _Origin] = {}
        self._merged: dict[ConfigKey, Config] = {}
        self._duplicates: list[ConfigError] = []
        self._listeners: list[ChangeListener] = []
        self._snapshot: StoreSnapshot | None = None
        self._generation = 0

    # --- writing (sources) -------------------------------------------------------------

    def set_origin(
        self,
        origin: str,
        configs: Iterable[Config],
        errors: Iterable[ConfigError] = (),
        *,
        keep_all_previous: bool = False,
    ) -> frozenset[ConfigKey]:
        """Replace what `origin` holds. Returns (and announces) the keys that changed.

        Objects named in `errors` keep their previous good version from this origin;
        with `keep_all_previous` (the whole origin failed to parse) every previous
        object stays.
        """
        previous = self._origins.get(origin, _Origin())
        errors = list(errors)
        fresh: dict[ConfigKey, Config] = {}
        local_dupes: list[ConfigError] = []
        for cfg in configs:
            if cfg.key in fresh:
                local_dupes.append(
                    ConfigError(
                        origin,
                        f"duplicate {cfg.kind} {cfg.namespace}/{cfg.name}: "
                        f"already defined in {fresh[cfg.key].origin}",
                        kind=cfg.kind,
                        namespace=cfg.namespace,
                        name=cfg.name,
                        field="metadata.name",
                    )
                )
                continue
            fresh[cfg.key] = cfg
        if keep_all_previous:
            for key, cfg in previous.configs.items():
                fresh.setdefault(key, cfg)
        else:
            for err in errors:
                if not err.kind or not err.name:
                    continue
                key = ConfigKey(err.kind, err.namespace or "default", err.name)
                if key in previous.configs and key not in fresh:
                    fresh[key] = previous.configs[key]
        new_errors = errors + local_dupes
        if new_errors and new_errors != previous.errors:
            for err in new_errors:
                log.warning("config rejected", error=str(err))
                metrics.CONFIG_ERRORS_TOTAL.labels(err.kind or "unknown").inc()
        self._origins[origin] = _Origin(fresh, new_errors)
        return self._commit()

    def remove_origin(self, origin: str) -> frozenset[ConfigKey]:
        if self._origins.pop(origin, None) is None:
            return frozenset()
        return self._commit()

    def apply(self, config: Config, origin: str | None = None) -> frozenset[ConfigKey]:
        """Set one object programmatically (watch events, tests, benchmarks)."""
        return self.set_origin(origin or f"api://{config.key}", [config])

    def delete(self, key: ConfigKey, origin: str | None = None) -> frozenset[ConfigKey]:
        return self.remove_origin(origin or f"api://{key}")

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    # --- reading ------------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        if self._snapshot is None:
            by_kind: dict[str, dict[ConfigKey, Config]] = {}
            for key, cfg in self._merged.items():
                by_kind.setdefault(key.kind, {})[key] = cfg
            self._snapshot = StoreSnapshot(
                MappingProxyType({k: MappingProxyType(v) for k, v in by_kind.items()}),
                self._generation,
            )
        return self._snapshot

    def errors(self) -> list[ConfigError]:
        out = [e for o in self._origins.values() for e in o.errors]
        return out + self._duplicates

    def origins(self) -> list[str]:
        return sorted(self._origins)

    # --- internals ----------------------------------------------------------------------

    def _commit(self) -> frozenset[ConfigKey]:
        merged: dict[ConfigKey, Config] = {}
        dupes: list[ConfigError] = []
        # Sorted origins make the winner of a cross-file duplicate deterministic.
        for origin in sorted(self._origins):
            for key, cfg in self._origins[origin].configs.items():
                if key in merged:
                    dupes.append(
                        ConfigError(
                            origin,
                            f"duplicate {key.kind} {key.namespace}/{key.name}: "
                            f"already defined in {merged[key].origin}; this one is ignored",
                            kind=key.kind,
                            namespace=key.namespace,
                            name=key.name,
                            field="metadata.name",
                        )
                    )
                    continue
                merged[key] = cfg
        changed = frozenset(
            k
            for k in merged.keys() | self._merged.keys()
            if _differs(merged.get(k), self._merged.get(k))
        )
        new_dupes = [d for d in dupes if d not in self._duplicates]
        for d in new_dupes:
            log.warning("config rejected", error=str(d))
            metrics.CONFIG_ERRORS_TOTAL.labels(d.kind or "unknown").inc()
        self._duplicates = dupes
        self._merged = merged
        if changed:
            self._generation += 1
            self._snapshot = None
            for listener in self._listeners:
                listener(changed)
        return changed


def _differs(a: Config | None, b: Config | None) -> bool:
    if a is None or b is None:
        return a is not b
    if a is b:
        return False
    # Programmatic configs may carry no revision: then any new object is a change.
    return not a.revision or a.revision != b.revision
