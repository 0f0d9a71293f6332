"""Go/protobuf-style durations (`1.5s`, `100ms`, `1h30m`), with no heavy imports: the
agent runs next to every Envoy and must stay small."""

from __future__ import annotations

import argparse
import re
from typing import Any

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> float:
    """Seconds from a duration string; ValueError with the expected form otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '1s' or '100ms', got a boolean")
    if isinstance(value, int | float):
        # Bare numbers are ambiguous; Istio rejects them too.
        raise ValueError(f"expected a duration with a unit such as '{value}s', got {value!r}")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a duration such as '1s' or '100ms', got {value!r}")
    text = value.strip()
    pos, total = 0, 0.0
    while pos < len(text):
        m = _PART.match(text, pos)
        if not m:
            raise ValueError(f"invalid duration {value!r}: expected e.g. '1s', '250ms', '1m30s'")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    return total


def duration_arg(text: str) -> float:
    """argparse type for durations."""
    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
