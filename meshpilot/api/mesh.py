"""Istio's MeshConfig: the subset meshpilot reads, from `--mesh-config FILE`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from meshpilot.api.errors import ConfigError, field_path


class _Mesh(BaseModel):
    # MeshConfig has many fields meshpilot does not use; unknown ones are ignored so a
    # full istio ConfigMap's `mesh` key can be pointed at directly.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class MeshOutboundTrafficPolicy(_Mesh):
    mode: Literal["REGISTRY_ONLY", "ALLOW_ANY"] = "ALLOW_ANY"


class ProxyConfig(_Mesh):
    discovery_address: str = ""
    proxy_stats_matcher: dict[str, Any] | None = None
    hold_application_until_proxy_starts: bool = False


class MeshConfig(_Mesh):
    trust_domain: str = "cluster.local"
    root_namespace: str = "istio-system"
    outbound_traffic_policy: MeshOutboundTrafficPolicy = Field(
        default_factory=MeshOutboundTrafficPolicy
    )
    default_config: ProxyConfig = Field(default_factory=ProxyConfig)
    enable_auto_mtls: bool = True
    connect_timeout: str = "10s"
    # Not a MeshConfig field in Istio (it is istiod's --domain flag); kept here so all
    # mesh-wide naming lives in one object.
    domain_suffix: str = "cluster.local"


def load_mesh_config(path: str | Path | None) -> MeshConfig:
    """Read a MeshConfig YAML file; raises ValueError naming the file and field."""
    if path is None:
        return MeshConfig()
    text = Path(path).read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ValueError(str(ConfigError(str(path), f"invalid YAML: {e}"))) from e
    if isinstance(data, dict) and isinstance(data.get("mesh"), str):
        # An istio ConfigMap's data section: the mesh config is a YAML string inside.
        data = yaml.safe_load(data["mesh"]) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a MeshConfig mapping")
    try:
        return MeshConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        err = ConfigError(str(path), first["msg"], field=field_path(tuple(first["loc"]), ""))
        raise ValueError(str(err)) from e
