"""Small builders and assertions shared by the emulator's tests."""

from __future__ import annotations

import json
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
