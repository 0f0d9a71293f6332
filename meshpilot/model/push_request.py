"""What a push is about: merged change events between two debounced pushes."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from meshpilot.config import ConfigKey, kinds
from meshpilot.config.kinds import ENDPOINT_KINDS

# Kinds whose changes the model turns into endpoint changes only: Pods and Nodes feed
# the endpoints of the slices that name them (labels, identity, locality); nothing
# reads Namespaces yet. A Pod change that alters what a proxy of that Pod sees makes
# the context ask for a full push (PushContext.requires_full_push).
ENDPOINT_ONLY_KINDS = ENDPOINT_KINDS | {kinds.POD, kinds.NODE, kinds.NAMESPACE}


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
        full = any(k.kind not in ENDPOINT_ONLY_KINDS for k in keys)
        return PushRequest(full=full, config_keys=keys, reasons=frozenset({reason}))
