"""What a push is about: merged change events between two debounced pushes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from meshpilot.config import ConfigKey
from meshpilot.config.kinds import ENDPOINT_KINDS


@dataclass(frozen=True, slots=True)
class PushRequest:
    """A (possibly merged) set of changes. `full` is false for endpoint-only changes."""

    full: bool = True
    config_keys: frozenset[ConfigKey] = frozenset()
    reasons: frozenset[str] = frozenset()
    # Monotonic time of the first change in this request, for convergence metrics.
    start: float = field(default_factory=time.monotonic)
    # Hostnames whose endpoints changed (for incremental EDS); empty on full pushes
    # means "all".
    eds_hosts: frozenset[str] = frozenset()

    def merge(self, other: PushRequest) -> PushRequest:
        return PushRequest(
            full=self.full or other.full,
            config_keys=self.config_keys | other.config_keys,
            reasons=self.reasons | other.reasons,
            start=min(self.start, other.start),
            eds_hosts=self.eds_hosts | other.eds_hosts,
        )

    @staticmethod
    def for_changes(keys: frozenset[ConfigKey], reason: str = "config") -> PushRequest:
        """A request whose fullness follows from the kinds that changed."""
        full = any(k.kind not in ENDPOINT_KINDS for k in keys)
        return PushRequest(full=full, config_keys=keys, reasons=frozenset({reason}))
