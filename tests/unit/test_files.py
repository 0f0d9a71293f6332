"""FileSource: initial load, live changes, last good versions, odd filesystem states."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from meshpilot.discovery import files
from meshpilot.discovery.files import FileSource
from meshpilot.discovery.store import ConfigStore

DEADLINE = 1.0  # changes must reach the store well within this


def dr(name: str, host: str = "h", namespace: str = "default") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec: {{host: {host}}}\n"
    )


def hosts(store: ConfigStore) -> dict[str, str]:
    return {k.name: c.spec.host for k, c in store.snapshot().of_kind("DestinationRule").items()}


async def wait_until(cond: Callable[[], bool], within: float = DEADLINE) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def running(source: FileSource) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run())
    await wait_until(lambda: source.stats()["watching"], within=2.0)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    d = tmp_path / "conf"
    d.mkdir()
    return d


def source(store: ConfigStore, *dirs: Path, **kw: object) -> FileSource:
    kw.setdefault("rescan_interval", 0.1)
    return FileSource(store, list(dirs), **kw)  # type: ignore[arg-type]


# --- initial load -------------------------------------------------------------------------


async def test_initial_load_recursive_with_hidden_and_temp_files_ignored(conf: Path) -> None:
    (conf / "a.yaml").write_text(dr("a"))
    (conf / "nested" / "deeper").mkdir(parents=True)
    (conf / "nested" / "b.yml").write_text(dr("b"))
    (conf / "nested" / "deeper" / "c.json").write_text(
        '{"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",'
        ' "metadata": {"name": "c"}, "spec": {"host": "h"}}'
    )
    (conf / "UPPER.YAML").write_text(dr("upper"))
    for ignored in (".hidden.yaml", "a.yaml~", "a.yaml.swp", ".#a.yaml", "notes.txt", "x.yaml.tmp"):
        (conf / ignored).write_text(dr("ignored"))
    (conf / ".git").mkdir()
    (conf / ".git" / "config.yaml").write_text(dr("ignored"))
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    assert sorted(hosts(store)) == ["a", "b", "c", "upper"]
    stats = src.stats()
    assert (stats["files"], stats["objects"], stats["errors"]) == (4, 4, 0)
    assert store.origins() == sorted(
        str(conf / p) for p in ("a.yaml", "nested/b.yml", "nested/deeper/c.json", "UPPER.YAML")
    )


async def test_origins_are_relative_when_directory_is(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(conf.parent)
    (conf / "bad.yaml").write_text(dr("ok") + "---\n" + dr("Bad"))
    store = ConfigStore()
    await source(store, Path("conf")).load_initial()
    assert store.origins() == ["conf/bad.yaml"]
    [err] = store.errors()
    assert str(err).startswith("conf/bad.yaml document 2 (DestinationRule default/Bad)")
    assert store.snapshot().of_kind("DestinationRule")  # the valid document is served


async def test_missing_directory_is_an_error_until_it_appears(tmp_path: Path) -> None:
    store = ConfigStore()
    conf = tmp_path / "later"
    src = source(store, conf)
    await src.load_initial()
    [err] = store.errors()
    assert err.origin == str(conf) and "does not exist" in err.message
    task = asyncio.create_task(src.run())
    try:
        await asyncio.sleep(0.05)
        conf.mkdir()
        (conf / "a.yaml").write_text(dr("a"))
        await wait_until(lambda: "a" in hosts(store))
        assert store.errors() == []
        await wait_until(lambda: src.stats()["watching"])
        (conf / "b.yaml").write_text(dr("b"))
        await wait_until(lambda: "b" in hosts(store))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_same_directory_twice_is_loaded_once(conf: Path) -> None:
    (conf / "a.yaml").write_text(dr("a"))
    store = ConfigStore()
    await source(store, conf, conf.parent / "conf" / ".." / "conf").load_initial()
    assert store.errors() == []


async def test_symlinks_followed_loops_and_dangling_links_survive(
    conf: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.yaml"
    outside.write_text(dr("outside"))
    (conf / "sub").mkdir()
    (conf / "sub" / "x.yaml").write_text(dr("x"))
    (conf / "link.yaml").symlink_to(outside)
    (conf / "sub" / "loop").symlink_to(conf)  # a directory loop
    (conf / "sub" / "self").symlink_to(conf / "sub" / "self")  # a symlink loop
    (conf / "dangling.yaml").symlink_to(tmp_path / "nowhere.yaml")
    (conf / "fifo.yaml").parent.mkdir(exist_ok=True)
    os.mkfifo(conf / "fifo.yaml")  # not a regular file: never opened
    store = ConfigStore()
    src = source(store, conf)
    await asyncio.wait_for(src.load_initial(), 5)
    assert sorted(hosts(store)) == ["outside", "x"]
    assert src.stats()["files"] == 2
    assert store.errors() == []


# --- live changes -------------------------------------------------------------------------


async def test_add_edit_delete_rename_within_deadline(conf: Path) -> None:
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    async with running(src):
        (conf / "a.yaml").write_text(dr("a"))
        await wait_until(lambda: hosts(store) == {"a": "h"})

        (conf / "a.yaml").write_text(dr("a", "edited"))
        await wait_until(lambda: hosts(store) == {"a": "edited"})

        os.rename(conf / "a.yaml", conf / "renamed.yaml")
        await wait_until(lambda: store.origins() == [str(conf / "renamed.yaml")])
        assert hosts(store) == {"a": "edited"}

        (conf / "renamed.yaml").unlink()
        await wait_until(lambda: hosts(store) == {})
        assert store.origins() == [] and src.stats()["files"] == 0


async def test_editor_saves_via_temp_file_and_rename(conf: Path) -> None:
    (conf / "a.yaml").write_text(dr("a", "v1"))
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    async with running(src):
        # vim: move the original to a backup, write anew, drop the backup.
        os.rename(conf / "a.yaml", conf / "a.yaml~")
        (conf / "a.yaml").write_text(dr("a", "v2"))
        (conf / "a.yaml~").unlink()
        await wait_until(lambda: hosts(store) == {"a": "v2"})
        # Atomic writers: a hidden temp file replaces the target.
        (conf / ".a.yaml.tmp123").write_text(dr("a", "v3"))
        os.replace(conf / ".a.yaml.tmp123", conf / "a.yaml")
        await wait_until(lambda: hosts(store) == {"a": "v3"})
        assert store.origins() == [str(conf / "a.yaml")]
        assert store.errors() == []


async def test_directories_created_renamed_moved_and_deleted(conf: Path, tmp_path: Path) -> None:
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    async with running(src):
        # Files written right after their directory exists, before any watch on it.
        (conf / "team" / "deep").mkdir(parents=True)
        (conf / "team" / "deep" / "a.yaml").write_text(dr("a"))
        (conf / "team" / "b.yaml").write_text(dr("b"))
        await wait_until(lambda: sorted(hosts(store)) == ["a", "b"])

        os.rename(conf / "team", conf / "squad")
        await wait_until(lambda: all("/squad/" in o for o in store.origins()))
        assert sorted(hosts(store)) == ["a", "b"]

        shutil.move(conf / "squad", tmp_path / "away")
        await wait_until(lambda: hosts(store) == {})

        (tmp_path / "away" / "c.yaml").write_text(dr("c"))
        shutil.move(tmp_path / "away", conf / "back")
        await wait_until(lambda: sorted(hosts(store)) == ["a", "b", "c"])

        shutil.rmtree(conf / "back")
        await wait_until(lambda: hosts(store) == {} and src.stats()["files"] == 0)


async def test_watched_directory_deleted_and_recreated(conf: Path) -> None:
    (conf / "a.yaml").write_text(dr("a"))
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    async with running(src):
        shutil.rmtree(conf)
        await wait_until(lambda: hosts(store) == {})
        conf.mkdir()  # noqa: ASYNC240
        (conf / "b.yaml").write_text(dr("b"))
        await wait_until(lambda: hosts(store) == {"b": "h"})
        # And the new directory is watched again.
        (conf / "c.yaml").write_text(dr("c"))
        await wait_until(lambda: sorted(hosts(store)) == ["b", "c"])


async def test_kubernetes_configmap_style_symlink_swap(conf: Path) -> None:
    # A ConfigMap volume: visible files link through `..data`, swapped atomically.
    v1 = conf / "..2024_01"
    v1.mkdir()
    (v1 / "a.yaml").write_text(dr("a", "v1"))
    (conf / "..data").symlink_to("..2024_01")
    (conf / "a.yaml").symlink_to("..data/a.yaml")
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    assert hosts(store) == {"a": "v1"}
    async with running(src):
        v2 = conf / "..2024_02"
        v2.mkdir()
        (v2 / "a.yaml").write_text(dr("a", "v2"))
        (conf / "..data_tmp").symlink_to("..2024_02")
        os.replace(conf / "..data_tmp", conf / "..data")
        shutil.rmtree(v1)
        await wait_until(lambda: hosts(store) == {"a": "v2"})


async def test_same_size_rewrite_in_same_tick_is_not_missed(conf: Path) -> None:
    path = conf / "a.yaml"
    path.write_text(dr("a", "aaaa"))
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    before = path.stat()
    # Same inode, same size, same mtime: only the content differs.
    with open(path, "r+") as f:  # noqa: ASYNC230
        f.write(dr("a", "bbbb"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    await src.load_initial()  # a plain rescan, no event to force a read
    assert hosts(store) == {"a": "bbbb"}


async def test_cancel_is_prompt(conf: Path) -> None:
    src = source(ConfigStore(), conf)
    task = asyncio.create_task(src.run())
    await wait_until(lambda: src.stats()["watching"], within=2.0)
    start = time.monotonic()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert time.monotonic() - start < 0.5
    assert not src.stats()["watching"]


async def test_falls_back_to_polling_when_watching_fails(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise OSError(28, "OS file watch limit reached")

    monkeypatch.setattr(files, "DirectoryWatcher", broken)
    store = ConfigStore()
    src = source(store, conf, rescan_interval=0.05)
    await src.load_initial()
    task = asyncio.create_task(src.run())
    try:
        (conf / "a.yaml").write_text(dr("a"))
        await wait_until(lambda: hosts(store) == {"a": "h"})
        (conf / "a.yaml").unlink()
        await wait_until(lambda: hosts(store) == {})
        assert src.stats()["watch_failures"] >= 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- bad content --------------------------------------------------------------------------


async def test_last_good_version_kept_while_invalid_and_restored_when_fixed(conf: Path) -> None:
    path = conf / "a.yaml"
    path.write_text(dr("a", "v1") + "---\n" + dr("b", "v1"))
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    async with running(src):
        path.write_text(dr("a", "v2") + "---\nkind: [\n")  # YAML syntax error
        await wait_until(lambda: len(store.errors()) == 1)
        [err] = store.errors()
        assert err.origin == str(path) and "invalid YAML at line" in err.message
        assert hosts(store) == {"a": "v1", "b": "v1"}  # all of the last good file
        assert src.stats()["errors"] == 1 and src.stats()["objects"] == 2

        # One bad object: it keeps its last good version, its sibling moves on.
        path.write_text(dr("a", "v3") + "---\n" + dr("b", "v3").replace("host:", "hots:"))
        await wait_until(lambda: hosts(store).get("a") == "v3")
        assert hosts(store)["b"] == "v1"
        [err] = store.errors()
        assert (err.document, err.name, err.field) == (2, "b", "spec.hots")
        assert err.message.startswith("unknown field")

        path.write_text(dr("a", "v4") + "---\n" + dr("b", "v4"))
        await wait_until(lambda: hosts(store) == {"a": "v4", "b": "v4"})
        assert store.errors() == [] and src.stats()["errors"] == 0


async def test_oversized_and_binary_files_keep_previous(conf: Path) -> None:
    path = conf / "a.yaml"
    path.write_text(dr("a"))
    store = ConfigStore()
    src = source(store, conf, max_file_bytes=1000)
    await src.load_initial()
    async with running(src):
        path.write_text(dr("a", "big") + "#" * 2000 + "\n")
        await wait_until(lambda: len(store.errors()) == 1)
        assert "byte limit" in store.errors()[0].message
        assert hosts(store) == {"a": "h"}
        path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x00garbage")
        await wait_until(lambda: "UTF-8" in "".join(e.message for e in store.errors()))
        assert hosts(store) == {"a": "h"}
        path.write_text(dr("a", "fixed"))
        await wait_until(lambda: hosts(store) == {"a": "fixed"} and not store.errors())


async def test_deleting_an_invalid_file_clears_its_errors(conf: Path) -> None:
    (conf / "bad.yaml").write_text("- just\n- a list\n")
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    assert len(store.errors()) == 1
    async with running(src):
        (conf / "bad.yaml").unlink()
        await wait_until(lambda: store.errors() == [])


async def test_duplicates_across_files_have_a_deterministic_winner(conf: Path) -> None:
    for order in (("b.yaml", "a.yaml"), ("a.yaml", "b.yaml")):
        for name in ("a.yaml", "b.yaml"):
            (conf / name).unlink(missing_ok=True)
        store = ConfigStore()
        src = source(store, conf)
        await src.load_initial()
        async with running(src):
            for name in order:
                (conf / name).write_text(dr("x", name.removesuffix(".yaml")))
                await asyncio.sleep(0.05)
            await wait_until(lambda: len(store.errors()) == 1)  # noqa: B023
            assert hosts(store) == {"x": "a"}
            [err] = store.errors()
            assert err.origin == str(conf / "b.yaml") and "duplicate" in err.message
            assert src.stats()["errors"] == 1
            (conf / "a.yaml").unlink()
            await wait_until(lambda: hosts(store) == {"x": "b"} and not store.errors())  # noqa: B023


async def test_temp_and_hidden_files_ignored_while_watching(conf: Path) -> None:
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    async with running(src):
        (conf / ".hidden.yaml").write_text(dr("hidden"))
        (conf / "b.yaml~").write_text(dr("backup"))
        (conf / ".b.yaml.swp").write_text(dr("swap"))
        (conf / "c.yaml").write_text(dr("c"))
        await wait_until(lambda: "c" in hosts(store))
        await asyncio.sleep(0.1)
        assert hosts(store) == {"c": "h"}
        assert store.origins() == [str(conf / "c.yaml")]


async def test_a_failing_scan_does_not_stop_the_source(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (conf / "a.yaml").write_text(dr("a"))
    real_scan = files._scan
    calls = 0

    def flaky(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return real_scan(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(files, "_scan", flaky)
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()  # logged, not raised
    assert hosts(store) == {}
    await src.load_initial()
    assert hosts(store) == {"a": "h"}


async def test_unlistable_directory_keeps_its_files_and_is_logged_once(
    conf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (conf / "a.yaml").write_text(dr("a"))
    (conf / "locked").mkdir()
    (conf / "locked" / "b.yaml").write_text(dr("b"))
    store = ConfigStore()
    src = source(store, conf)
    await src.load_initial()
    assert sorted(hosts(store)) == ["a", "b"]

    real_scandir = os.scandir
    locked = str(conf / "locked")

    def scandir(path: str) -> object:
        if str(path) == locked:
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with capture_logs() as logs:
        await src.load_initial()
        await src.load_initial()
    assert sorted(hosts(store)) == ["a", "b"]  # unknown is not deleted
    warnings = [e for e in logs if e["event"] == "cannot list config directory"]
    assert len(warnings) == 1 and warnings[0]["path"] == locked
