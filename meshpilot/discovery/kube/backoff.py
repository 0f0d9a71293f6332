"""Retry pacing and object naming shared by the Kubernetes informers.

client-go's reflector backs off exponentially with jitter between failed lists and
watches (800 ms -> 30 s); meshpilot uses 1 s -> 30 s with full jitter on the upper half,
so that many informers (and many istiods) that lost the same API server do not all come
back in the same instant.
"""

from __future__ import annotations

import random


class Backoff:
    """Exponential delays from `initial` to `maximum`, each drawn from [d/2, d]."""

    def __init__(
        self, initial: float = 1.0, maximum: float = 30.0, rng: random.Random | None = None
    ) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError(f"backoff: need 0 < initial <= maximum, got {initial}, {maximum}")
        self.initial = initial
        self.maximum = maximum
        self._next = initial
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt; doubles each call up to `maximum`."""
        ceiling = self._next
        self._next = min(self._next * 2, self.maximum)
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._next = self.initial


def object_name(kind: str, namespace: str, name: str, cluster_id: str) -> str:
    """`Kind ns/name (cluster ID)`, the way errors and logs name a Kubernetes object.
    Cluster-scoped objects have no namespace part."""
    ref = f"{namespace}/{name}" if namespace else name
    return f"{kind} {ref} ({cluster_id})"
