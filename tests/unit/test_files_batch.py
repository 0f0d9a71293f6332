"""Loading many files at once: linear work, and the event loop keeps running meanwhile."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from meshpilot.discovery import files, scan
from meshpilot.discovery.files import FileSource
from meshpilot.discovery.store import ConfigStore
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings

FILES = 400


def dr(name: str) -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: {name}}}\nspec: {{host: {name}}}\n"
    )


def write(directory: Path, first: int, count: int) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(first, first + count):
        path = directory / f"dr-{i}.yaml"
        path.write_text(dr(f"dr-{i}"))
        paths.append(str(path))
    return paths


async def test_serve_counts_config_without_walking_the_store_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, 0, FILES)
    (tmp_path / "bad.yaml").write_text("kind: [unclosed\n")
    server = MeshServer(Settings(config_dirs=[tmp_path]))
    assert server.files is not None
    walks = {"errors": 0, "snapshot": 0}
    for name in walks:
        real = getattr(server.store, name)

        def counted(real: object = real, name: str = name) -> object:
            walks[name] += 1
            return real()  # type: ignore[operator]

        monkeypatch.setattr(server.store, name, counted)
    await server.files.load_initial()
    assert len(server.store.object_counts()) == 1
    assert server.store.object_counts()["DestinationRule"] == FILES
    assert dict(server.store.error_counts()) == {"": 1}
    # Each file's change is counted from the store's running totals: nothing walks
    # every object or every error once per file (the summary logged after the batch
    # reads the errors once).
    assert walks["snapshot"] == 0
    assert walks["errors"] <= 1


async def test_a_batch_of_new_files_is_not_compared_pairwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, 0, FILES)
    store = ConfigStore()
    src = FileSource(store, [tmp_path])
    await src.load_initial()
    real_covers = scan.Scope.covers
    calls = 0

    def covers(self: scan.Scope, rel: scan.Rel) -> bool:
        nonlocal calls
        calls += 1
        return real_covers(self, rel)

    monkeypatch.setattr(scan.Scope, "covers", covers)
    added = write(tmp_path / "more", FILES, FILES)
    await src.apply_changes([str(tmp_path / "more"), *added])
    assert len(store.snapshot()) == 2 * FILES
    # Pairwise checks of scopes against scopes and known files would be ~FILES^2.
    assert calls <= FILES


async def test_the_event_loop_runs_between_chunks_of_a_large_batch(tmp_path: Path) -> None:
    write(tmp_path, 0, 5 * files._CHUNK)
    store = ConfigStore()
    ticks = 0
    seen_at: list[int] = []
    store.subscribe(lambda _keys: seen_at.append(ticks))

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    try:
        await FileSource(store, [tmp_path]).load_initial()
    finally:
        task.cancel()
    assert len(seen_at) == 5 * files._CHUNK
    # Other tasks ran while the batch was applied, not only before or after it.
    assert seen_at[0] < seen_at[-1]
