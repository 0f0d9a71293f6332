"""Fixtures: a running API server emulator and a real kubernetes_asyncio client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from tests.kube.apiserver import ApiServer


@pytest.fixture
async def apiserver() -> AsyncIterator[ApiServer]:
    server = ApiServer(bookmark_interval=0.2, too_large_rv_wait=0.2)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def kubeconfig(apiserver: ApiServer, tmp_path: Path) -> Path:
    return apiserver.write_kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
async def api_client(kubeconfig: Path) -> AsyncIterator[client.ApiClient]:
    api = await config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield api
    finally:
        await api.close()
