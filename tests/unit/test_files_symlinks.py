"""Symlinks inside the config tree: each real directory and file is read once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from meshpilot.discovery.files import FileSource
from meshpilot.discovery.store import ConfigStore

DEADLINE = 1.0  # changes must reach the store well within this


def dr(name: str, host: str = "h") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: {name}}}\nspec: {{host: {host}}}\n"
    )


def hosts(store: ConfigStore) -> dict[str, str]:
    return {k.name: c.spec.host for k, c in store.snapshot().of_kind("DestinationRule").items()}


async def wait_until(cond: Callable[[], bool], within: float = DEADLINE) -> None:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(source: FileSource) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run())
    await wait_until(lambda: source.stats()["watching"], within=5.0)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    d = tmp_path / "conf"
    (d / "sub").mkdir(parents=True)
    (d / "a.yaml").write_text(dr("a"))
    (d / "sub" / "b.yaml").write_text(dr("b"))
    return d


async def test_symlink_to_the_directory_inside_itself_loads_each_file_once(conf: Path) -> None:
    (conf / "self").symlink_to(conf)
    (conf / "sub" / "up").symlink_to(conf)
    (conf / "sub-again").symlink_to(conf / "sub")
    (conf / "z-alias.yaml").symlink_to(conf / "a.yaml")  # a symlinked file into the tree
    store = ConfigStore()
    src = FileSource(store, [conf], rescan_interval=0.1)
    await src.load_initial()
    assert store.errors() == []
    assert store.origins() == [str(conf / "a.yaml"), str(conf / "sub" / "b.yaml")]
    assert src.stats()["files"] == 2

    async with running(src):
        (conf / "a.yaml").write_text(dr("a", "edited"))
        (conf / "sub" / "b.yaml").write_text(dr("b", "edited"))
        await wait_until(lambda: hosts(store) == {"a": "edited", "b": "edited"})
        # A new file appears under every alias of its directory, and is read once.
        (conf / "sub" / "c.yaml").write_text(dr("c"))
        await wait_until(lambda: "c" in hosts(store))
        await asyncio.sleep(0.2)  # let any event under an alias path arrive too
        assert store.errors() == []
        assert str(conf / "sub" / "c.yaml") in store.origins()
        assert len(store.origins()) == 3


async def test_alias_events_are_read_under_the_first_path(conf: Path) -> None:
    (conf / "self").symlink_to(conf)
    store = ConfigStore()
    src = FileSource(store, [conf])
    await src.load_initial()
    # Watchers that follow symlinks report changes under the alias path.
    (conf / "sub" / "b.yaml").write_text(dr("b", "edited"))
    (conf / "sub" / "c.yaml").write_text(dr("c"))
    await src.apply_changes(
        [str(conf / "self" / "sub" / "b.yaml"), str(conf / "self" / "sub" / "c.yaml")]
    )
    await src.apply_changes([str(conf / "self" / "self" / "sub")])
    assert store.errors() == []
    assert hosts(store) == {"a": "h", "b": "edited", "c": "h"}
    assert store.origins() == [
        str(conf / "a.yaml"),
        str(conf / "sub" / "b.yaml"),
        str(conf / "sub" / "c.yaml"),
    ]


async def test_a_directory_moved_keeps_its_files_under_the_new_name(conf: Path) -> None:
    store = ConfigStore()
    src = FileSource(store, [conf])
    await src.load_initial()
    (conf / "sub").rename(conf / "moved")
    (conf / "sub-link").symlink_to(conf / "moved")
    await src.apply_changes([str(conf / "sub"), str(conf / "moved"), str(conf / "sub-link")])
    assert store.errors() == []
    assert store.origins() == [str(conf / "a.yaml"), str(conf / "moved" / "b.yaml")]


async def test_a_symlinked_file_whose_target_goes_is_read_through_the_link(
    conf: Path, tmp_path: Path
) -> None:
    (conf / "z-alias.yaml").symlink_to(conf / "a.yaml")
    store = ConfigStore()
    src = FileSource(store, [conf])
    await src.load_initial()
    assert store.origins() == [str(conf / "a.yaml"), str(conf / "sub" / "b.yaml")]
    # The target moves out of the tree: the link is the only path to it now.
    (conf / "a.yaml").rename(tmp_path / "a.yaml")
    (conf / "z-alias.yaml").unlink()
    (conf / "z-alias.yaml").symlink_to(tmp_path / "a.yaml")
    await src.apply_changes([str(conf / "a.yaml"), str(conf / "z-alias.yaml")])
    assert store.errors() == []
    assert hosts(store) == {"a": "h", "b": "h"}
    assert store.origins() == [str(conf / "sub" / "b.yaml"), str(conf / "z-alias.yaml")]
