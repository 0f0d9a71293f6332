"""The file source: YAML/JSON files under directories, watched, into the config store.

Each file is one store origin named by its path as given, so errors name the file the
user edited. A file that cannot be read or parsed as a whole keeps its last good
objects. Changes are found by rescanning the part of the tree an inotify event names
and comparing (inode, mtime, size) and then a content hash, which copes with editors
that write through temp files and renames, with directories moved in or out, and with
events that inotify drops. Reads and parsing run in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import structlog

from meshpilot.api.errors import ConfigError
from meshpilot.discovery.scan import (
    Coverage,
    FileState,
    Identity,
    Rel,
    Root,
    ScanResult,
    Scope,
    ignored_name,
    outermost,
)
from meshpilot.discovery.scan import scan as _scan
from meshpilot.discovery.store import ConfigStore
from meshpilot.discovery.watcher import DirectoryWatcher, Outcome

log = structlog.get_logger(__name__)

MAX_FILE_BYTES = 4 * 1024 * 1024

_STEP_MS = 10
# Files applied to the store between two yields to the event loop.
_CHUNK = 200


class FileSource:
    """Loads and watches config files under `directories` into `store`."""

    def __init__(
        self,
        store: ConfigStore,
        directories: Sequence[Path],
        *,
        max_file_bytes: int = MAX_FILE_BYTES,
        debounce_ms: int = 50,
        rescan_interval: float = 1.0,
        resync_interval: float = 10.0,
    ) -> None:
        self._store = store
        self._roots: list[Root] = []
        for d in directories:
            root = Root(Path(d), os.path.abspath(d), os.path.realpath(d))
            # The same directory twice would make every object its own duplicate.
            if all(r.absolute != root.absolute for r in self._roots):
                self._roots.append(root)
        self._max_file_bytes = max_file_bytes
        self._debounce_ms = debounce_ms
        self._rescan_interval = rescan_interval
        self._resync_interval = resync_interval
        self._files: dict[tuple[int, Rel], FileState] = {}
        self._dirs: dict[int, dict[Identity, Rel]] = {}
        self._missing_roots: set[int] = set()
        self._unlisted: dict[tuple[int, Rel], str] = {}
        self._lock = asyncio.Lock()
        self._watching = False
        self._watch_failures = 0
        self._last_change = 0.0

    # --- public ---------------------------------------------------------------------------

    async def load_initial(self) -> None:
        """Load every config file once; call before serving."""
        async with self._lock:
            await self._sync([Scope(i, (), True) for i in range(len(self._roots))], set())
        s = self.stats()
        log.info(
            "config files loaded",
            directories=[str(r.given) for r in self._roots],
            files=s["files"],
            objects=s["objects"],
            errors=s["errors"],
        )

    async def run(self) -> None:
        """Watch the directories and apply changes until cancelled."""
        retry_after = 5.0
        while True:
            identities = await asyncio.to_thread(self._identities)
            present = [i for i, ident in enumerate(identities) if ident is not None]
            if not present:
                await self._resync()
                await asyncio.sleep(self._rescan_interval)
                continue
            try:
                await self._watch(present)
                retry_after = 5.0
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # inotify limits, a root vanishing under us, or a watcher bug: keep
                # serving changes by polling, and try the watcher again later.
                self._watch_failures += 1
                log.warning(
                    "file watch failed, polling instead",
                    error=f"{type(e).__name__}: {e}",
                    retry_in=retry_after,
                )
                await self._poll(retry_after)
                retry_after = min(retry_after * 2, 60.0)

    def stats(self) -> dict[str, Any]:
        """Counts for /debug/configz."""
        return {
            "directories": [str(r.given) for r in self._roots],
            "files": len(self._files),
            "objects": sum(f.objects for f in self._files.values()),
            "errors": sum(1 for e in self._store.errors() if e.origin in self._origins()),
            "watching": self._watching,
            "watch_failures": self._watch_failures,
            "last_change": self._last_change,
        }

    def _origins(self) -> set[str]:
        out = {self._roots[i].origin(rel) for i, rel in self._files}
        return out | {str(r.given) for r in self._roots}

    # --- watching -------------------------------------------------------------------------

    async def _watch(self, roots: list[int]) -> None:
        """Apply inotify events until cancelled or until a root is replaced.

        DirectoryWatcher rather than watchfiles' `awatch`: its watches exist once it is
        constructed, so the rescan after it misses nothing, and stopping it takes one
        step rather than a whole timeout.
        """
        identities = await asyncio.to_thread(self._identities)
        stop = threading.Event()
        paths = [self._roots[i].absolute for i in roots]
        # Setting up recursive watches lists the whole tree: not on the loop.
        watcher = await asyncio.to_thread(DirectoryWatcher, paths)
        monitor: asyncio.Task[None] | None = None
        try:
            self._watching = True
            await self._resync()
            monitor = asyncio.create_task(self._monitor(identities, stop))
            while True:
                outcome = await self._next_changes(watcher, stop)
                if outcome == "stop":
                    return
                if isinstance(outcome, set):
                    paths = list(outcome)
                    await self.apply_changes(paths)
                    if any(self._locate(path) == (i, ()) for path in paths for i in roots):
                        # A root itself was deleted or replaced; its inode number may
                        # be reused at once, which the monitor cannot tell apart.
                        return
        finally:
            self._watching = False
            stop.set()
            if monitor is not None:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
            watcher.close()

    async def _next_changes(self, watcher: DirectoryWatcher, stop: threading.Event) -> Outcome:
        pending = asyncio.ensure_future(
            asyncio.to_thread(watcher.changes, self._debounce_ms, _STEP_MS, 1000, stop)
        )
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            # The thread sees `stop` within a step; closing the watcher under it would
            # fail, so wait for it before letting the cancellation through.
            stop.set()
            await asyncio.wait([pending])
            raise

    async def _monitor(
        self, identities: list[tuple[int, int] | None], stop: threading.Event
    ) -> None:
        """Restart the watch when a root is replaced; resync now and then regardless.

        inotify watches inodes: a root deleted and recreated, or a missing root that
        appears, is invisible to the running watch.
        """
        next_resync = time.monotonic() + self._resync_interval
        while True:
            await asyncio.sleep(self._rescan_interval)
            if await asyncio.to_thread(self._identities) != identities:
                stop.set()
                return
            if time.monotonic() >= next_resync:
                # Catches what inotify cannot see, such as edits behind symlinks.
                await self._resync()
                next_resync = time.monotonic() + self._resync_interval

    async def _poll(self, duration: float) -> None:
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            await asyncio.sleep(self._rescan_interval)
            await self._resync()

    def _identities(self) -> list[tuple[int, int] | None]:
        out: list[tuple[int, int] | None] = []
        for root in self._roots:
            try:
                st = os.stat(root.absolute)
            except OSError:
                out.append(None)
            else:
                out.append((st.st_dev, st.st_ino))
        return out

    async def _resync(self) -> None:
        async with self._lock:
            await self._sync([Scope(i, (), True) for i in range(len(self._roots))], set())

    async def apply_changes(self, paths: Iterable[str]) -> None:
        """Rescan what changed at these filesystem paths (as a watcher reports them)."""
        scopes: set[Scope] = set()
        forced: set[tuple[int, Rel]] = set()
        for path in paths:
            located = self._locate(path)
            if located is None:
                continue
            index, rel = located
            ignored_at = next((n for n, part in enumerate(rel) if ignored_name(part)), None)
            if ignored_at is not None:
                # Temp and hidden files are not config, but a change among them can still
                # swap what visible names point to (Kubernetes ConfigMap `..data` links).
                scopes.add(Scope(index, rel[:ignored_at], False))
                continue
            scopes.add(Scope(index, rel, True))
            forced.add((index, rel))
        if not scopes:
            return
        async with self._lock:
            await self._sync(outermost(scopes), forced)

    def _locate(self, path: str) -> tuple[int, Rel] | None:
        for index, root in enumerate(self._roots):
            for base in (root.absolute, root.real):
                if path == base:
                    return index, ()
                if path.startswith(base.rstrip(os.sep) + os.sep):
                    rel = tuple(p for p in path[len(base) :].split(os.sep) if p)
                    return index, rel
        return None

    # --- scanning -------------------------------------------------------------------------

    async def _sync(self, scopes: Iterable[Scope], forced: set[tuple[int, Rel]]) -> None:
        """Rescan `scopes` and bring the store in line. Caller holds the lock."""
        by_root: dict[int, list[Scope]] = {}
        for scope in scopes:
            by_root.setdefault(scope.root, []).append(scope)
        for index, root_scopes in sorted(by_root.items()):
            known = {rel: st for (i, rel), st in self._files.items() if i == index}
            force = {rel for i, rel in forced if i == index}
            dirs = dict(self._dirs.get(index, {}))
            try:
                result = await asyncio.to_thread(
                    _scan,
                    self._roots[index],
                    root_scopes,
                    known,
                    force,
                    self._max_file_bytes,
                    dirs,
                )
            except Exception:
                # A bug here must not stop the source: the next event or resync retries.
                log.exception("config scan failed", directory=str(self._roots[index].given))
                continue
            self._note_dirs(index, result)
            await self._apply(index, result.scopes, known, result)

    def _note_dirs(self, index: int, result: ScanResult) -> None:
        """Remember which path each walked directory was read by."""
        walked = Coverage(result.scopes)
        dirs = {
            ident: rel for ident, rel in self._dirs.get(index, {}).items() if not walked.walked(rel)
        }
        dirs.update(result.dirs)
        self._dirs[index] = dirs

    async def _apply(
        self, index: int, scopes: list[Scope], known: dict[Rel, FileState], result: ScanResult
    ) -> None:
        root = self._roots[index]
        if any(s.rel == () for s in scopes):
            self._note_root(index, result.root_exists)
        self._note_unlisted(index, scopes, result.unlisted)
        changed = False
        covered = Coverage(scopes)
        steps = 0
        # Removals first: a file renamed in the same batch then does not briefly
        # collide with itself under its old name.
        for rel in sorted(known):
            if rel in result.found or not covered(rel):
                continue
            if any(rel[: len(u)] == u for u in result.unlisted):
                continue
            del self._files[(index, rel)]
            self._store.remove_origin(root.origin(rel))
            log.debug("config file removed", file=root.origin(rel))
            changed = True
            steps += 1
            if steps % _CHUNK == 0:
                await asyncio.sleep(0)
        for rel, st in result.found.items():
            loaded = result.loaded.get(rel)
            state = self._files.get((index, rel))
            if loaded is None:
                if state is not None:
                    state.stat = st
                continue
            if loaded.result is None:
                if state is not None:
                    state.stat, state.read_at_ns = loaded.stat, loaded.read_at_ns
                continue
            origin = root.origin(rel)
            parsed = loaded.result
            self._store.set_origin(
                origin, parsed.configs, parsed.errors, keep_all_previous=loaded.failed
            )
            objects = len(parsed.configs)
            if loaded.failed and state is not None:
                objects = state.objects
            self._files[(index, rel)] = FileState(
                loaded.stat, loaded.digest, loaded.read_at_ns, objects
            )
            log.debug("config file loaded", file=origin, objects=objects, errors=len(parsed.errors))
            changed = True
            steps += 1
            if steps % _CHUNK == 0:
                # Thousands of files in one batch: let /ready, xDS and pushes run
                # between chunks. The lock keeps other scans out meanwhile.
                await asyncio.sleep(0)
        if changed:
            self._last_change = time.time()

    def _note_unlisted(self, index: int, scopes: list[Scope], unlisted: dict[Rel, str]) -> None:
        """Log an unreadable directory once, not on every rescan."""
        for key in [k for k in self._unlisted if k[0] == index]:
            listed_now = any(s.rel == key[1] or (s.recursive and s.covers(key[1])) for s in scopes)
            if key[1] not in unlisted and listed_now:
                del self._unlisted[key]
        for rel, error in unlisted.items():
            if self._unlisted.get((index, rel)) != error:
                self._unlisted[(index, rel)] = error
                log.warning(
                    "cannot list config directory", path=self._roots[index].origin(rel), error=error
                )

    def _note_root(self, index: int, exists: bool) -> None:
        """A missing directory is reported as an error on the directory's own name."""
        root = self._roots[index]
        if exists and index in self._missing_roots:
            self._missing_roots.discard(index)
            self._store.remove_origin(str(root.given))
        elif not exists and index not in self._missing_roots:
            self._missing_roots.add(index)
            self._store.set_origin(
                str(root.given), [], [ConfigError(str(root.given), "directory does not exist")]
            )
