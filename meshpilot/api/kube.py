"""The parts of Kubernetes kinds that the mesh reads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from meshpilot.api.base import KubeModel, Port


class KubeServicePort(KubeModel):
    name: str = ""
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str = ""
    port: Port
    target_port: Port | str | None = None


class KubeServiceSpec(KubeModel):
    selector: dict[str, str] | None = None
    ports: list[KubeServicePort] = Field(default_factory=list)
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    cluster_ip: str = Field(default="", alias="clusterIP")
    external_name: str = ""
