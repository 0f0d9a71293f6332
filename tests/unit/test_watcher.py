"""DirectoryWatcher against a real directory: the private watchfiles API still behaves."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from meshpilot.discovery.watcher import DirectoryWatcher


def changes_until(watcher: DirectoryWatcher, wanted: str, stop: threading.Event) -> set[str]:
    """Collect changed paths until `wanted` is among them (or 5 s pass)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 5
    while wanted not in seen and time.monotonic() < deadline:
        outcome = watcher.changes(50, 10, 500, stop)
        if isinstance(outcome, set):
            seen |= outcome
    return seen


def test_create_modify_delete_and_nested_changes_are_reported(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    watcher = DirectoryWatcher([str(tmp_path)])
    stop = threading.Event()
    try:
        # The watch exists on return: a change made right away is not lost.
        created = tmp_path / "a.yaml"
        created.write_text("a: 1\n")
        assert str(created) in changes_until(watcher, str(created), stop)

        created.write_text("a: 2\n")
        assert str(created) in changes_until(watcher, str(created), stop)

        nested = tmp_path / "sub" / "b.yaml"
        nested.write_text("b: 1\n")
        assert str(nested) in changes_until(watcher, str(nested), stop)

        created.unlink()
        assert str(created) in changes_until(watcher, str(created), stop)
        assert watcher.changes(50, 10, 100, stop) == "timeout"
    finally:
        watcher.close()


def test_stop_is_seen_within_a_step(tmp_path: Path) -> None:
    watcher = DirectoryWatcher([str(tmp_path)])
    stop = threading.Event()
    stop.set()
    try:
        # A timeout of 60 s: only the stop event can make this return.
        assert watcher.changes(50, 10, 60_000, stop) == "stop"
    finally:
        watcher.close()
