"""Small builders and assertions shared by the emulator's tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

NET = "networking.istio.io"
SEC = "security.istio.io"
MERGE = "application/merge-patch+json"


def status_of(exc: ApiException) -> dict[str, Any]:
    """The v1 Status an error carries, checked to be one."""
    body: dict[str, Any] = json.loads(exc.body or b"")
    assert body["kind"] == "Status" and body["apiVersion"] == "v1"
    assert body["status"] == "Failure" and body["code"] == exc.status
    return body


def cm(name: str, labels: dict[str, str] | None = None, **data: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}}, "data": data}


def vs(name: str, version: str = "v1", host: str = "reviews") -> dict[str, Any]:
    return {
        "apiVersion": f"{NET}/{version}",
        "kind": "VirtualService",
        "metadata": {"name": name},
        "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host}}]}]},
    }


async def wait_until(cond: Callable[[], object], within: float) -> None:
    """Wait until `cond()` is true; fail the test after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not cond():
        assert loop.time() < deadline, f"condition not met within {within:g}s"
        await asyncio.sleep(0.02)
