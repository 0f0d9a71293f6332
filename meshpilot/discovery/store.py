"""The config store: every source's objects in one place, with the last good version kept.

Sources hand over what one origin (a file, a watched object) holds now. The store keeps,
per origin, the objects that validated; an object that fails keeps its last good
version, and a file that fails to parse keeps all of its last good objects. Listeners
hear which keys changed; error listeners hear the error count by kind whenever it
changes, including for rejections that change no object.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import structlog

from meshpilot.api.errors import ConfigError
from meshpilot.api.kinds import KINDS
from meshpilot.config import Config, ConfigKey, StoreSnapshot
from meshpilot.monitoring import metrics

log = structlog.get_logger(__name__)

ChangeListener = Callable[[frozenset[ConfigKey]], None]
ErrorListener = Callable[[Mapping[str, int]], None]


@dataclass(slots=True)
class _Origin:
    configs: dict[ConfigKey, Config] = field(default_factory=dict)
    errors: list[ConfigError] = field(default_factory=list)


class ConfigStore:
    def __init__(self) -> None:
        self._origins: dict[str, _Origin] = {}
        self._merged: dict[ConfigKey, Config] = {}
        # Which origins define each key: a change touches only the keys of one origin.
        self._owners: dict[ConfigKey, set[str]] = {}
        self._dupes_by_key: dict[ConfigKey, list[ConfigError]] = {}
        self._by_kind: dict[str, dict[ConfigKey, Config]] = {}
        self._dirty_kinds: set[str] = set()
        self._listeners: list[ChangeListener] = []
        self._error_listeners: list[ErrorListener] = []
        # Kept up to date change by change, so that a batch of N files costs O(N) to
        # count rather than a walk over every error after every file.
        self._error_counts: dict[str, int] = {}
        self._snapshot: StoreSnapshot | None = None
        self._last_snapshot: StoreSnapshot | None = None
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
                local_dupes.append(_duplicate(origin, cfg.key, fresh[cfg.key].origin))
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
                metrics.CONFIG_ERRORS_TOTAL.labels(kind_label(err.kind)).inc()
        self._origins[origin] = _Origin(fresh, new_errors)
        counted = self._count_errors(previous.errors, new_errors)
        return self._commit(origin, previous.configs.keys() | fresh.keys(), counted)

    def remove_origin(self, origin: str) -> frozenset[ConfigKey]:
        previous = self._origins.pop(origin, None)
        if previous is None:
            return frozenset()
        counted = self._count_errors(previous.errors, ())
        return self._commit(origin, previous.configs.keys(), counted)

    def apply(self, config: Config, origin: str | None = None) -> frozenset[ConfigKey]:
        """Set one object programmatically (watch events, tests, benchmarks)."""
        return self.set_origin(origin or f"api://{config.key}", [config])

    def delete(self, key: ConfigKey, origin: str | None = None) -> frozenset[ConfigKey]:
        return self.remove_origin(origin or f"api://{key}")

    def subscribe(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def subscribe_errors(self, listener: ErrorListener) -> None:
        """`listener(error_counts())` after every change of the error counts."""
        self._error_listeners.append(listener)

    # --- reading ------------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        if self._snapshot is None:
            # Copy only the kinds that changed; the others are shared with the last one.
            previous = self._last_snapshot.by_kind if self._last_snapshot else {}
            by_kind = {
                kind: (
                    MappingProxyType(dict(objs))
                    if kind in self._dirty_kinds or kind not in previous
                    else previous[kind]
                )
                for kind, objs in self._by_kind.items()
                if objs
            }
            self._dirty_kinds.clear()
            self._snapshot = StoreSnapshot(MappingProxyType(by_kind), self._generation)
            self._last_snapshot = self._snapshot
        return self._snapshot

    def errors(self) -> list[ConfigError]:
        out = [e for o in self._origins.values() for e in o.errors]
        return out + [d for key in sorted(self._dupes_by_key) for d in self._dupes_by_key[key]]

    def origins(self) -> list[str]:
        return sorted(self._origins)

    def error_counts(self) -> Mapping[str, int]:
        """Current errors by object kind ("" when no kind is known); kinds that had
        errors and have none now stay, at 0. Costs O(kinds), not O(errors)."""
        return MappingProxyType(self._error_counts)

    def object_counts(self) -> dict[str, int]:
        """Objects in effect by kind; a kind that had objects and has none now is 0."""
        return {kind: len(objs) for kind, objs in self._by_kind.items()}

    # --- internals ----------------------------------------------------------------------

    def _count_errors(self, old: Iterable[ConfigError], new: Iterable[ConfigError]) -> bool:
        """Move the error counts from `old` to `new`; True when any count changed."""
        delta: dict[str, int] = {}
        for err in old:
            delta[err.kind] = delta.get(err.kind, 0) - 1
        for err in new:
            delta[err.kind] = delta.get(err.kind, 0) + 1
        counted = False
        for kind, n in delta.items():
            if n:
                self._error_counts[kind] = self._error_counts.get(kind, 0) + n
                counted = True
        return counted

    def _commit(
        self, origin: str, keys: Iterable[ConfigKey], counted: bool = False
    ) -> frozenset[ConfigKey]:
        """Re-decide the winner of each key `origin` held or holds now.

        `counted`: the caller changed the error counts, so error listeners are due.
        """
        held = self._origins.get(origin)
        changed: set[ConfigKey] = set()
        for key in keys:
            owners = self._owners.setdefault(key, set())
            if held is not None and key in held.configs:
                owners.add(origin)
            else:
                owners.discard(origin)
            # Sorted origins make the winner of a cross-file duplicate deterministic.
            ordered = sorted(owners)
            winner = self._origins[ordered[0]].configs[key] if ordered else None
            dupes = [
                _duplicate(other, key, winner.origin, "; this one is ignored")
                for other in ordered[1:]
                if winner is not None
            ]
            old_dupes = self._dupes_by_key.get(key, [])
            counted = self._count_errors(old_dupes, dupes) or counted
            for d in dupes:
                if d not in old_dupes:
                    log.warning("config rejected", error=str(d))
                    metrics.CONFIG_ERRORS_TOTAL.labels(kind_label(d.kind)).inc()
            if dupes:
                self._dupes_by_key[key] = dupes
            else:
                self._dupes_by_key.pop(key, None)
            if not owners:
                del self._owners[key]
            if _differs(winner, self._merged.get(key)):
                changed.add(key)
                kind_map = self._by_kind.setdefault(key.kind, {})
                if winner is None:
                    self._merged.pop(key, None)
                    kind_map.pop(key, None)
                else:
                    self._merged[key] = winner
                    kind_map[key] = winner
                self._dirty_kinds.add(key.kind)
        if counted:
            counts = self.error_counts()
            for error_listener in self._error_listeners:
                error_listener(counts)
        if changed:
            self._generation += 1
            self._snapshot = None
            frozen = frozenset(changed)
            for listener in self._listeners:
                listener(frozen)
            return frozen
        return frozenset()


def kind_label(kind: str) -> str:
    """The metric label for errors of `kind`: a kind the user made up would otherwise
    mint a new time series per typo."""
    return kind if kind in KINDS else "unknown"


def _differs(a: Config | None, b: Config | None) -> bool:
    if a is None or b is None:
        return a is not b
    if a is b:
        return False
    # Programmatic configs may carry no revision: then any new object is a change.
    return not a.revision or a.revision != b.revision


def _duplicate(origin: str, key: ConfigKey, first: str, consequence: str = "") -> ConfigError:
    return ConfigError(
        origin,
        f"duplicate {key.kind} {key.namespace}/{key.name}: already defined in {first}"
        + consequence,
        kind=key.kind,
        namespace=key.namespace,
        name=key.name,
        field="metadata.name",
    )
