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
import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from watchfiles._rust_notify import RustNotify

from meshpilot.api.errors import ConfigError
from meshpilot.api.parse import ParseResult, parse_text
from meshpilot.discovery.store import ConfigStore

log = structlog.get_logger(__name__)

CONFIG_SUFFIXES = frozenset({".yaml", ".yml", ".json"})
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 64
"""Directory depth limit, a backstop behind the symlink loop check."""

# A file modified within this window of our read may have been modified again within
# the same filesystem timestamp tick with the same size: its stat cannot be trusted.
_RACY_NS = 2_000_000_000
_STEP_MS = 10
# Files applied to the store between two yields to the event loop.
_CHUNK = 200

Rel = tuple[str, ...]
"""A path relative to its root, as parts; () is the root itself (a single-file root)."""


@dataclass(frozen=True, slots=True)
class _StatKey:
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @staticmethod
    def of(st: os.stat_result) -> _StatKey:
        return _StatKey(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(slots=True)
class _FileState:
    stat: _StatKey
    digest: str
    read_at_ns: int
    objects: int


@dataclass(frozen=True, slots=True)
class _Root:
    given: Path
    absolute: str
    real: str

    def origin(self, rel: Rel) -> str:
        return str(self.given.joinpath(*rel)) if rel else str(self.given)

    def fs_path(self, rel: Rel) -> str:
        return os.path.join(self.absolute, *rel) if rel else self.absolute


@dataclass(frozen=True, slots=True)
class _Scope:
    """Part of one root to rescan: a file, a directory's files, or a whole subtree."""

    root: int
    rel: Rel
    recursive: bool

    def covers(self, rel: Rel) -> bool:
        n = len(self.rel)
        if rel[:n] != self.rel:
            return False
        return self.recursive or len(rel) <= n + 1


@dataclass(slots=True)
class _Loaded:
    stat: _StatKey
    digest: str
    read_at_ns: int
    # None when the content is unchanged since the last read.
    result: ParseResult | None
    # Set when the file failed as a whole: it keeps all its previous objects.
    failed: bool = False


@dataclass(slots=True)
class _ScanResult:
    found: dict[Rel, _StatKey]
    loaded: dict[Rel, _Loaded]
    # Directories that could not be listed: what we knew under them stays.
    unlisted: dict[Rel, str]
    root_exists: bool = True


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
        self._roots: list[_Root] = []
        for d in directories:
            root = _Root(Path(d), os.path.abspath(d), os.path.realpath(d))
            # The same directory twice would make every object its own duplicate.
            if all(r.absolute != root.absolute for r in self._roots):
                self._roots.append(root)
        self._max_file_bytes = max_file_bytes
        self._debounce_ms = debounce_ms
        self._rescan_interval = rescan_interval
        self._resync_interval = resync_interval
        self._files: dict[tuple[int, Rel], _FileState] = {}
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
            await self._sync([_Scope(i, (), True) for i in range(len(self._roots))], set())
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

        watchfiles' RustNotify rather than `awatch`: its watches exist once it is
        constructed, so the rescan after it misses nothing, and stopping it takes one
        step rather than a whole timeout.
        """
        identities = await asyncio.to_thread(self._identities)
        stop = threading.Event()
        paths = [self._roots[i].absolute for i in roots]
        # Setting up recursive watches lists the whole tree: not on the loop.
        watcher = await asyncio.to_thread(RustNotify, paths, False, False, 300, True, True)
        monitor: asyncio.Task[None] | None = None
        try:
            self._watching = True
            await self._resync()
            monitor = asyncio.create_task(self._monitor(identities, stop))
            while True:
                raw = await self._next_changes(watcher, stop)
                if raw == "stop":
                    return
                if isinstance(raw, set):
                    paths = [path for _, path in raw]
                    await self.apply_changes(paths)
                    if any(self._locate(path) == (i, ()) for path in paths for i in roots):
                        # A root itself was deleted or replaced; its inode number may
                        # be reused at once, which the monitor cannot tell apart.
                        return
                elif raw != "timeout":
                    raise RuntimeError(f"file watcher returned {raw!r}")
        finally:
            self._watching = False
            stop.set()
            if monitor is not None:
                monitor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await monitor
            watcher.close()

    async def _next_changes(
        self, watcher: RustNotify, stop: threading.Event
    ) -> set[tuple[int, str]] | str:
        pending = asyncio.ensure_future(
            asyncio.to_thread(watcher.watch, self._debounce_ms, _STEP_MS, 1000, stop)
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
            await self._sync([_Scope(i, (), True) for i in range(len(self._roots))], set())

    async def apply_changes(self, paths: Iterable[str]) -> None:
        """Rescan what changed at these filesystem paths (as a watcher reports them)."""
        scopes: set[_Scope] = set()
        forced: set[tuple[int, Rel]] = set()
        for path in paths:
            located = self._locate(path)
            if located is None:
                continue
            index, rel = located
            ignored_at = next((n for n, part in enumerate(rel) if _ignored_name(part)), None)
            if ignored_at is not None:
                # Temp and hidden files are not config, but a change among them can still
                # swap what visible names point to (Kubernetes ConfigMap `..data` links).
                scopes.add(_Scope(index, rel[:ignored_at], False))
                continue
            scopes.add(_Scope(index, rel, True))
            forced.add((index, rel))
        if not scopes:
            return
        async with self._lock:
            await self._sync(_outermost(scopes), forced)

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

    async def _sync(self, scopes: Iterable[_Scope], forced: set[tuple[int, Rel]]) -> None:
        """Rescan `scopes` and bring the store in line. Caller holds the lock."""
        by_root: dict[int, list[_Scope]] = {}
        for scope in scopes:
            by_root.setdefault(scope.root, []).append(scope)
        for index, root_scopes in sorted(by_root.items()):
            known = {rel: st for (i, rel), st in self._files.items() if i == index}
            force = {rel for i, rel in forced if i == index}
            try:
                result = await asyncio.to_thread(
                    _scan, self._roots[index], root_scopes, known, force, self._max_file_bytes
                )
            except Exception:
                # A bug here must not stop the source: the next event or resync retries.
                log.exception("config scan failed", directory=str(self._roots[index].given))
                continue
            await self._apply(index, root_scopes, known, result)

    async def _apply(
        self, index: int, scopes: list[_Scope], known: dict[Rel, _FileState], result: _ScanResult
    ) -> None:
        root = self._roots[index]
        if any(s.rel == () for s in scopes):
            self._note_root(index, result.root_exists)
        self._note_unlisted(index, scopes, result.unlisted)
        changed = False
        covered = _Coverage(scopes)
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
            self._files[(index, rel)] = _FileState(
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

    def _note_unlisted(self, index: int, scopes: list[_Scope], unlisted: dict[Rel, str]) -> None:
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


def _outermost(scopes: set[_Scope]) -> list[_Scope]:
    """Drop scopes that a recursive scope of the same root already covers.

    O(scopes x depth): a batch of thousands of new files must not compare every pair.
    """
    recursive = {(s.root, s.rel) for s in scopes if s.recursive}
    out = []
    for s in scopes:
        if any((s.root, s.rel[:n]) in recursive for n in range(len(s.rel))):
            continue  # under a recursive scope higher up
        if not s.recursive and (s.root, s.rel) in recursive:
            continue  # the directory's files, with the whole subtree rescanned anyway
        out.append(s)
    return sorted(out, key=lambda s: (s.root, s.rel, s.recursive))


class _Coverage:
    """`covered(rel)`: does any of `scopes` (of one root) cover `rel`? O(depth) a call."""

    def __init__(self, scopes: Iterable[_Scope]) -> None:
        self._recursive = {s.rel for s in scopes if s.recursive}
        self._flat = {s.rel for s in scopes if not s.recursive}

    def __call__(self, rel: Rel) -> bool:
        if any(rel[:n] in self._recursive for n in range(len(rel) + 1)):
            return True
        return rel in self._flat or rel[:-1] in self._flat


def _ignored_name(name: str) -> bool:
    """Hidden files and directories (.git, ..data) and editor temp files."""
    return name.startswith(".") or name.endswith(("~", ".swp", ".swx", ".tmp"))


def _is_config_file(name: str) -> bool:
    return not _ignored_name(name) and os.path.splitext(name)[1].lower() in CONFIG_SUFFIXES


# --- the worker-thread part ---------------------------------------------------------------


def _scan(
    root: _Root,
    scopes: list[_Scope],
    known: dict[Rel, _FileState],
    forced: set[Rel],
    max_bytes: int,
) -> _ScanResult:
    out = _ScanResult({}, {}, {}, os.path.exists(root.absolute))
    for scope in scopes:
        _walk(root, scope, out)
    now = time.time_ns()
    for rel, st in list(out.found.items()):
        state = known.get(rel)
        if (
            state is not None
            and rel not in forced
            and state.stat == st
            and st.mtime_ns + _RACY_NS < state.read_at_ns
        ):
            continue
        loaded = _load(root, rel, state, max_bytes, now)
        if loaded is None:
            del out.found[rel]  # deleted since it was listed: an event will follow
        else:
            out.loaded[rel] = loaded
    return out


def _walk(root: _Root, scope: _Scope, out: _ScanResult) -> None:
    start = root.fs_path(scope.rel)
    try:
        st = os.stat(start)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        if not scope.rel or _is_config_file(scope.rel[-1]):
            out.found[scope.rel] = _StatKey.of(st)
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    visited: set[tuple[int, int]] = set()
    stack: list[tuple[Rel, os.stat_result]] = [(scope.rel, st)]
    while stack:
        rel, dir_st = stack.pop()
        identity = (dir_st.st_dev, dir_st.st_ino)
        # Following symlinked directories can loop; each directory is listed once.
        if identity in visited or len(rel) > MAX_DEPTH:
            continue
        visited.add(identity)
        try:
            entries = sorted(os.scandir(root.fs_path(rel)), key=lambda e: e.name)
        except OSError as e:
            out.unlisted[rel] = e.strerror or str(e)
            continue
        subdirs = []
        for entry in entries:
            if _ignored_name(entry.name):
                continue
            try:
                est = entry.stat(follow_symlinks=True)
            except OSError:
                continue  # dangling or looping symlink, or gone already
            child = (*rel, entry.name)
            if stat.S_ISDIR(est.st_mode):
                if scope.recursive:
                    subdirs.append((child, est))
            elif stat.S_ISREG(est.st_mode) and _is_config_file(entry.name):
                out.found[child] = _StatKey.of(est)
        # Reversed so that the stack pops them in name order: with symlinked
        # directories the path that reaches a directory first is deterministic.
        stack.extend(reversed(subdirs))


def _load(
    root: _Root, rel: Rel, state: _FileState | None, max_bytes: int, now_ns: int
) -> _Loaded | None:
    origin = root.origin(rel)
    path = root.fs_path(rel)

    def failed(message: str, st: _StatKey, digest: str = "") -> _Loaded:
        digest = digest or f"error:{message}"
        if state is not None and state.digest == digest:
            return _Loaded(st, digest, now_ns, None)
        result = ParseResult(errors=[ConfigError(origin, message)])
        return _Loaded(st, digest, now_ns, result, failed=True)

    try:
        # O_NONBLOCK: a FIFO swapped in after the stat must not hang the thread.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            raw = os.fstat(f.fileno())
            if not stat.S_ISREG(raw.st_mode):
                return None  # swapped for a FIFO or device since it was listed
            st = _StatKey.of(raw)
            if st.size > max_bytes:
                return failed(f"file is {st.size} bytes, over the {max_bytes} byte limit", st)
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        return failed(f"cannot read file: {e.strerror or e}", _StatKey(0, 0, -1, 0))
    if len(data) > max_bytes:
        return failed(f"file is over the {max_bytes} byte limit", st)
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if state is not None and state.digest == digest:
        return _Loaded(st, digest, now_ns, None)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return failed(f"not valid UTF-8 (byte {e.start}); is this a binary file?", st, digest)
    result = parse_text(text.removeprefix("\ufeff"), origin)
    # Errors with no document index mean no document could be read at all.
    whole = any(e.document is None for e in result.errors)
    return _Loaded(st, digest, now_ns, result, failed=whole)
