"""Client-supplied text on its way into logs, status messages and metric labels.

Anything a peer sends (node ids, type URLs, nonces, NACK messages, metadata values) can
be megabytes long or carry control characters. It is shown only through these helpers:
cut to a bounded length, with the original length said, and escaped so that one log
record stays one line. Stdlib only, so every floor (and the agent) may use it.
"""

from __future__ import annotations

import re

DEFAULT_LIMIT = 256

# A version as Istio and Envoy write it: 1.24.0, 1.24.0-beta.1, 1.25-dev, 1.24.0+build.
_VERSION = re.compile(r"[0-9]+(\.[0-9A-Za-z]+){0,3}([-+][0-9A-Za-z.\-+_]*)?")
MAX_VERSION_CHARS = 32
UNKNOWN = "unknown"


def truncate_untrusted(value: object, limit: int = DEFAULT_LIMIT) -> str:
    """`value` as text of at most about `limit` characters, on one line."""
    text = value if isinstance(value, str) else str(value)
    size = len(text)
    if size > limit:
        text = text[:limit]
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")[:limit]
    if size > limit:
        return f"{text}...({size} chars)"
    return text


def version_label(value: object) -> str:
    """A version-shaped string of at most MAX_VERSION_CHARS, else "unknown".

    For Prometheus labels fed by clients: the set of values must stay small, and
    anything that does not look like a release version gets one shared bucket.
    """
    if isinstance(value, str) and len(value) <= MAX_VERSION_CHARS and _VERSION.fullmatch(value):
        return value
    return UNKNOWN
