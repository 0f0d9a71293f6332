"""Fixtures for end-to-end tests with real Envoy processes; helpers live in `harness`."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ProcessTracker, envoy_binary, unique_loopback_ip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Keep each phase's report on the item so that fixtures can tell a failed test
    # at teardown and print the logs of what it started.
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture(scope="session")
def envoy_bin() -> str:
    """Path of the Envoy binary; fails (never skips) when it is missing."""
    return envoy_binary()


@pytest.fixture
def loopback_ip() -> str:
    """A 127.x.y.z address that no other test in any concurrent run got."""
    return unique_loopback_ip()


@pytest.fixture
async def processes(
    request: pytest.FixtureRequest, tmp_path: Path, envoy_bin: str
) -> AsyncIterator[ProcessTracker]:
    """Start Envoys, helper processes and demo backends; all are stopped at teardown."""
    tracker = ProcessTracker(tmp_path)
    try:
        yield tracker
    finally:
        failed = getattr(getattr(request.node, "rep_call", None), "failed", False)
        if failed and tracker.items:
            print(f"\n--- logs of processes started by {request.node.nodeid} ---")
            print(tracker.log_tails())
        await tracker.close()
