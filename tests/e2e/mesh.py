"""An in-process `meshpilot serve` on a temporary config directory, for end-to-end tests."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshpilot.serve import MeshServer
from meshpilot.settings import Settings
from tests.e2e.harness import EnvoyProcess, http_get

SYNC_TYPES = ("cluster", "listener", "route", "endpoint")


class Mesh:
    """A control plane on 127.0.0.1 with free ports, its config directory, and helpers."""

    def __init__(self, config_dir: Path, **settings: Any) -> None:
        self.config_dir = config_dir
        self.server = MeshServer(
            Settings(
                config_dirs=[config_dir],
                xds_address="127.0.0.1:0",
                monitoring_address="127.0.0.1:0",
                **settings,
            )
        )

    async def start(self) -> Mesh:
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop()

    @property
    def xds_address(self) -> str:
        return f"127.0.0.1:{self.server.xds_port}"

    @property
    def monitoring(self) -> str:
        return f"http://127.0.0.1:{self.server.monitoring_port}"

    def write(self, name: str, text: str) -> Path:
        path = self.config_dir / name
        tmp = path.with_suffix(".tmp~")
        tmp.write_text(text)
        tmp.rename(path)  # atomic, as editors and kubectl-like tools write
        return path

    async def get(self, path: str) -> tuple[int, Any]:
        resp = await http_get(self.monitoring + path)
        try:
            return resp.status, json.loads(resp.body)
        except ValueError:
            return resp.status, resp.text

    async def syncz(self, proxy_id: str) -> Mapping[str, Any]:
        _, entries = await self.get("/debug/syncz")
        for entry in entries:
            if entry["proxy"] == proxy_id:
                return entry
        raise LookupError(f"{proxy_id} not in /debug/syncz")

    async def wait_synced(self, envoy: EnvoyProcess, timeout: float = 10.0) -> Mapping[str, Any]:  # noqa: ASYNC109
        """Until meshpilot sees every type sent and ACKed by this Envoy."""

        async def synced() -> Mapping[str, Any] | None:
            entry = await self.syncz(envoy.name)
            ok = all(
                entry[f"{t}_sent"] and entry[f"{t}_sent"] == entry[f"{t}_acked"] for t in SYNC_TYPES
            )
            return entry if ok else None

        return await envoy.wait_for(synced, timeout, message=f"{envoy.name} to ACK all types")


def service_yaml(name: str, port: int = 9080, port_name: str = "http", ns: str = "default") -> str:
    return f"""apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{app: {name}}}
  ports:
  - {{name: {port_name}, port: {port}}}
"""


def workload_yaml(
    name: str, app: str, address: str, *, port: int | None = None, version: str = "v1"
) -> str:
    ports = f"\n  ports: {{http: {port}, tcp: {port}}}" if port else ""
    return f"""apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: {name}}}
spec:
  address: {address}
  labels: {{app: {app}, version: {version}}}{ports}
"""


def egress_sidecar_yaml(name: str, app: str, bind: str, port: int = 9080) -> str:
    """Explicit mode: an egress listener bound to `bind:port`, no traffic capture."""
    return f"""apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: {name}}}
spec:
  workloadSelector:
    labels: {{app: {app}}}
  egress:
  - port: {{number: {port}, protocol: HTTP, name: http}}
    bind: {bind}
    captureMode: NONE
    hosts: ["./*"]
"""
