"""inotify (through watchfiles' Rust core) behind one small class.

The file source needs two things watchfiles' public `awatch` does not give: the watches
must exist when the watcher is constructed, so that the rescan right after misses
nothing (awatch sets them up inside its first iteration, a gap in which a change is
lost), and stopping must take one short step (awatch's cancel waits out its timeout).
`watchfiles._rust_notify.RustNotify` does both, but it is private API: this module is
the only place that touches it, and pyproject pins watchfiles to the major version it
was tested with. Istio's file source (pkg/config/source/file, fsnotify) has neither
problem in Go.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Literal

from watchfiles._rust_notify import RustNotify

Outcome = set[str] | Literal["stop", "timeout"]


class DirectoryWatcher:
    """Recursive watches on `paths`, set up on construction (blocking: call it off the
    event loop, as setting up the watches lists the whole tree)."""

    def __init__(self, paths: Sequence[str]) -> None:
        # debug off, no forced polling (poll delay unused), recursive, and a directory
        # that cannot be read is skipped rather than failing the whole watch.
        self._notify = RustNotify(list(paths), False, False, 300, True, True)

    def changes(
        self, debounce_ms: int, step_ms: int, timeout_ms: int, stop: threading.Event
    ) -> Outcome:
        """Block until something changed: the paths that did, grouped for up to
        `debounce_ms`; or "stop" once `stop` is set (seen within `step_ms`); or
        "timeout" after `timeout_ms` without a change. Blocking: call it in a thread."""
        raw = self._notify.watch(debounce_ms, step_ms, timeout_ms, stop)
        if isinstance(raw, set):
            return {path for _, path in raw}
        if raw in ("stop", "timeout"):
            return raw
        # "signal" is only returned on the main thread, where this never runs.
        raise RuntimeError(f"file watcher returned {raw!r}")

    def close(self) -> None:
        self._notify.close()
