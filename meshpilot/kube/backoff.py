"""Jittered exponential backoff for retrying calls to the API server: 1 s doubling to 30 s.

client-go's informers and Istio's controllers back off exponentially with jitter so that
many replicas (or many controllers of one replica) do not retry in lockstep after an API
server restart. Here each delay is drawn from the upper half of the current step
("equal jitter"): never less than half the step, never more than the cap.
"""

from __future__ import annotations

import random

INITIAL = 1.0
MAXIMUM = 30.0


class Backoff:
    """`next()` gives the delay before the next attempt; `reset()` after a success."""

    def __init__(
        self,
        initial: float = INITIAL,
        maximum: float = MAXIMUM,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum
        self._step = initial
        self._rng = rng or random.Random()

    def next(self) -> float:
        step = self._step
        self._step = min(self._step * 2, self.maximum)
        return step / 2 + self._rng.uniform(0, step / 2)

    def reset(self) -> None:
        self._step = self.initial
