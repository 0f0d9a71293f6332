"""The worker-thread half of the file source: walk part of a tree, read what changed.

Nothing here touches the store or the event loop; `scan` runs in a thread and returns
what it found for the file source to apply.

Symlinks are followed, but each real directory and each real file is read once: a
symlink whose target lies inside the same tree, at a path the walk visits anyway, is an
alias and is skipped (the target's own path names the origin), and a directory or file
reached a second time by (st_dev, st_ino) through links that lead out of the tree is
skipped too. A path that a watcher reports under an alias is rescanned at its real path.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from meshpilot.api.errors import ConfigError
from meshpilot.api.parse import ParseResult, parse_text

CONFIG_SUFFIXES = frozenset({".yaml", ".yml", ".json"})
MAX_DEPTH = 64
"""Directory depth limit, a backstop behind the symlink loop check."""

# A file modified within this window of our read may have been modified again within
# the same filesystem timestamp tick with the same size: its stat cannot be trusted.
_RACY_NS = 2_000_000_000

Rel = tuple[str, ...]
"""A path relative to its root, as parts; () is the root itself (a single-file root)."""
Identity = tuple[int, int]
"""(st_dev, st_ino) of a directory or file, symlinks followed."""


@dataclass(frozen=True, slots=True)
class StatKey:
    dev: int
    ino: int
    size: int
    mtime_ns: int

    @staticmethod
    def of(st: os.stat_result) -> StatKey:
        return StatKey(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(slots=True)
class FileState:
    stat: StatKey
    digest: str
    read_at_ns: int
    objects: int


@dataclass(frozen=True, slots=True)
class Root:
    given: Path
    absolute: str
    real: str

    def origin(self, rel: Rel) -> str:
        return str(self.given.joinpath(*rel)) if rel else str(self.given)

    def fs_path(self, rel: Rel) -> str:
        return os.path.join(self.absolute, *rel) if rel else self.absolute

    def canonical(self, rel: Rel) -> Rel | None:
        """The path the walk reaches `rel`'s real target by, when that differs from `rel`.

        None when `rel` is its own real path, or when its target is outside the tree or
        somewhere the walk does not go (hidden, such as Kubernetes' `..data`): then
        `rel` is the only path that reads it.
        """
        if not rel:
            return None
        real = os.path.realpath(self.fs_path(rel))
        base = self.real.rstrip(os.sep) + os.sep
        if real == self.real:
            return ()
        if not real.startswith(base):
            return None
        target = tuple(p for p in real[len(base) :].split(os.sep) if p)
        if target == rel or len(target) > MAX_DEPTH or any(ignored_name(p) for p in target):
            return None
        return target


@dataclass(frozen=True, slots=True)
class Scope:
    """Part of one root to rescan: a file, a directory's files, or a whole subtree."""

    root: int
    rel: Rel
    recursive: bool

    def covers(self, rel: Rel) -> bool:
        n = len(self.rel)
        if rel[:n] != self.rel:
            return False
        return self.recursive or len(rel) <= n + 1


class Coverage:
    """`covered(rel)`: does any of `scopes` (of one root) cover `rel`? O(depth) a call."""

    def __init__(self, scopes: Iterable[Scope]) -> None:
        self._recursive = {s.rel for s in scopes if s.recursive}
        self._flat = {s.rel for s in scopes if not s.recursive}

    def __call__(self, rel: Rel) -> bool:
        if self.walked(rel):
            return True
        return rel in self._flat or rel[:-1] in self._flat

    def walked(self, rel: Rel) -> bool:
        """Whether `rel` is inside a recursive scope (a directory there is walked)."""
        return any(rel[:n] in self._recursive for n in range(len(rel) + 1))


@dataclass(slots=True)
class Loaded:
    stat: StatKey
    digest: str
    read_at_ns: int
    # None when the content is unchanged since the last read.
    result: ParseResult | None
    # Set when the file failed as a whole: it keeps all its previous objects.
    failed: bool = False


@dataclass(slots=True)
class ScanResult:
    found: dict[Rel, StatKey]
    loaded: dict[Rel, Loaded]
    # Directories that could not be listed: what we knew under them stays.
    unlisted: dict[Rel, str]
    root_exists: bool = True
    # What was rescanned: the scopes asked for, plus the real paths of aliases.
    scopes: list[Scope] = field(default_factory=list)
    # Every directory walked, by identity: the next partial rescan skips these
    # when they are reached by another path.
    dirs: dict[Identity, Rel] = field(default_factory=dict)


def ignored_name(name: str) -> bool:
    """Hidden files and directories (.git, ..data) and editor temp files."""
    return name.startswith(".") or name.endswith(("~", ".swp", ".swx", ".tmp"))


def is_config_file(name: str) -> bool:
    return not ignored_name(name) and os.path.splitext(name)[1].lower() in CONFIG_SUFFIXES


def real_scopes(
    root: Root, scopes: Iterable[Scope], forced: set[Rel]
) -> tuple[set[Scope], set[Rel], set[Rel]]:
    """`scopes` plus, for each one named through an alias, the same scope at its real
    path (the alias itself stays, so that what was known under it is dropped); `forced`
    with the real paths of the forced ones; and the paths that are aliases."""
    out, forced, aliases = set(scopes), set(forced), set()
    for s in list(out):
        target = root.canonical(s.rel)
        if target is not None:
            aliases.add(s.rel)
            out.add(Scope(s.root, target, s.recursive))
            if s.rel in forced:
                forced.add(target)
    return out, forced, aliases


def outermost(scopes: Iterable[Scope]) -> list[Scope]:
    """Drop scopes that a recursive scope of the same root already covers.

    O(scopes x depth): a batch of thousands of new files must not compare every pair.
    """
    scopes = set(scopes)
    recursive = {(s.root, s.rel) for s in scopes if s.recursive}
    out = []
    for s in scopes:
        if any((s.root, s.rel[:n]) in recursive for n in range(len(s.rel))):
            continue  # under a recursive scope higher up
        if not s.recursive and (s.root, s.rel) in recursive:
            continue  # the directory's files, with the whole subtree rescanned anyway
        out.append(s)
    return sorted(out, key=lambda s: (s.root, s.rel, s.recursive))


def scan(
    root: Root,
    scopes: list[Scope],
    known: dict[Rel, FileState],
    forced: set[Rel],
    max_bytes: int,
    dirs: dict[Identity, Rel],
) -> ScanResult:
    """Walk `scopes` of `root` and read the files that are new, forced or changed.

    Paths reported under an alias are rescanned at their real path as well.

    `dirs` are the directories walked before; those outside the scopes, and the files
    known outside them, keep their paths: reaching them again is reaching an alias.
    """
    wanted, forced, aliases = real_scopes(root, scopes, forced)
    scopes = outermost(wanted)
    out = ScanResult({}, {}, {}, os.path.exists(root.absolute), scopes)
    covered = Coverage(scopes)
    seen_dirs = {ident: rel for ident, rel in dirs.items() if not covered.walked(rel)}
    seen_files = {(f.stat.dev, f.stat.ino): rel for rel, f in known.items() if not covered(rel)}
    for scope in scopes:
        # An alias is walked at its real path (a scope of its own) only.
        if scope.rel not in aliases:
            _walk(root, scope, out, seen_dirs, seen_files)
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
        loaded = load(root, rel, state, max_bytes, now)
        if loaded is None:
            del out.found[rel]  # deleted since it was listed: an event will follow
        else:
            out.loaded[rel] = loaded
    return out


def _claim(root: Root, seen: dict[Identity, Rel], st: os.stat_result, rel: Rel) -> bool:
    """Take `st`'s identity for `rel`; False when another path has it already."""
    identity = (st.st_dev, st.st_ino)
    owner = seen.setdefault(identity, rel)
    if owner == rel:
        return True
    # An owner remembered from an earlier scan may be gone, its inode number reused.
    try:
        now = os.stat(root.fs_path(owner))
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != identity:
        seen[identity] = rel
        return True
    return False


def _walk(
    root: Root,
    scope: Scope,
    out: ScanResult,
    seen_dirs: dict[Identity, Rel],
    seen_files: dict[Identity, Rel],
) -> None:
    start = root.fs_path(scope.rel)
    try:
        st = os.stat(start)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode):
        if (not scope.rel or is_config_file(scope.rel[-1])) and _claim(
            root, seen_files, st, scope.rel
        ):
            out.found[scope.rel] = StatKey.of(st)
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    stack: list[tuple[Rel, os.stat_result]] = [(scope.rel, st)]
    while stack:
        rel, dir_st = stack.pop()
        # Following symlinked directories can loop; each directory is listed once.
        if len(rel) > MAX_DEPTH or not _claim(root, seen_dirs, dir_st, rel):
            continue
        out.dirs[(dir_st.st_dev, dir_st.st_ino)] = rel
        try:
            entries = sorted(os.scandir(root.fs_path(rel)), key=lambda e: e.name)
        except OSError as e:
            out.unlisted[rel] = e.strerror or str(e)
            continue
        subdirs = []
        for entry in entries:
            if ignored_name(entry.name):
                continue
            try:
                est = entry.stat(follow_symlinks=True)
            except OSError:
                continue  # dangling or looping symlink, or gone already
            is_dir = stat.S_ISDIR(est.st_mode)
            if is_dir and not scope.recursive:
                continue
            if not is_dir and not (stat.S_ISREG(est.st_mode) and is_config_file(entry.name)):
                continue
            child = (*rel, entry.name)
            if entry.is_symlink() and root.canonical(child) is not None:
                continue  # an alias of a path inside the tree: read there
            if is_dir:
                subdirs.append((child, est))
            elif _claim(root, seen_files, est, child):
                out.found[child] = StatKey.of(est)
        # Reversed so that the stack pops them in name order: with symlinked
        # directories the path that reaches a directory first is deterministic.
        stack.extend(reversed(subdirs))


def load(
    root: Root, rel: Rel, state: FileState | None, max_bytes: int, now_ns: int
) -> Loaded | None:
    origin = root.origin(rel)
    path = root.fs_path(rel)

    def failed(message: str, st: StatKey, digest: str = "") -> Loaded:
        digest = digest or f"error:{message}"
        if state is not None and state.digest == digest:
            return Loaded(st, digest, now_ns, None)
        result = ParseResult(errors=[ConfigError(origin, message)])
        return Loaded(st, digest, now_ns, result, failed=True)

    try:
        # O_NONBLOCK: a FIFO swapped in after the stat must not hang the thread.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            raw = os.fstat(f.fileno())
            if not stat.S_ISREG(raw.st_mode):
                return None  # swapped for a FIFO or device since it was listed
            st = StatKey.of(raw)
            if st.size > max_bytes:
                return failed(f"file is {st.size} bytes, over the {max_bytes} byte limit", st)
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        return failed(f"cannot read file: {e.strerror or e}", StatKey(0, 0, -1, 0))
    if len(data) > max_bytes:
        return failed(f"file is over the {max_bytes} byte limit", st)
    digest = hashlib.blake2b(data, digest_size=16).hexdigest()
    if state is not None and state.digest == digest:
        return Loaded(st, digest, now_ns, None)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return failed(f"not valid UTF-8 (byte {e.start}); is this a binary file?", st, digest)
    name = rel[-1] if rel else root.given.name
    syntax: Literal["yaml", "json"] = "json" if name.lower().endswith(".json") else "yaml"
    result = parse_text(text.removeprefix("\ufeff"), origin, syntax=syntax)
    # Errors with no document index mean no document could be read at all.
    whole = any(e.document is None for e in result.errors)
    return Loaded(st, digest, now_ns, result, failed=whole)
