"""The mesh ConfigMap (`istio` in the system namespace, key `mesh`) and discoverySelectors.

Istio reads MeshConfig from this ConfigMap and watches it; a missing ConfigMap means
the defaults. `discoverySelectors` is a list of label selectors, ORed: a namespace is
in the mesh's view when any of them matches its labels (an empty list: every
namespace). Istio always keeps its own system namespace in view; so does meshpilot.
An invalid `mesh` value is an error on the ConfigMap and the last good MeshConfig
stays in effect, as istiod does when a reload fails.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from meshpilot.api.errors import ConfigError, field_path
from meshpilot.api.kube import LabelSelector
from meshpilot.api.mesh import MeshConfig

MESH_CONFIGMAP = "istio"
MESH_KEY = "mesh"
MAX_SELECTORS = 64
# YAML aliases can make a small text expand to billions of nodes once walked.
MAX_MESH_NODES = 100_000


@dataclass(frozen=True, slots=True)
class MeshView:
    """The parts of the mesh ConfigMap the Kubernetes source uses."""

    mesh_config: MeshConfig = field(default_factory=MeshConfig)
    # None: no discoverySelectors, every namespace is in view.
    discovery_selectors: tuple[LabelSelector, ...] | None = None

    def selects(self, labels: Mapping[str, str]) -> bool:
        if not self.discovery_selectors:
            return True
        return any(s.matches(dict(labels)) for s in self.discovery_selectors)


def parse_mesh(configmap: Mapping[str, Any] | None, origin: str) -> MeshView | ConfigError:
    """The MeshView a ConfigMap holds; the defaults when it is missing or has no `mesh`."""
    if configmap is None:
        return MeshView()
    meta = configmap.get("metadata") or {}
    ns, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")

    def error(message: str, fld: str) -> ConfigError:
        return ConfigError(origin, message, None, "ConfigMap", ns, name, fld)

    text = (configmap.get("data") or {}).get(MESH_KEY)
    if text is None:
        return MeshView()
    try:
        data = yaml.safe_load(text) if isinstance(text, str) else None
    except yaml.YAMLError as e:
        return error(f"invalid YAML: {e}", "data.mesh")
    if data is None:
        return MeshView()
    if _expands_beyond(data, MAX_MESH_NODES):
        return error(f"expands to over {MAX_MESH_NODES} nodes", "data.mesh")
    if not isinstance(data, dict):
        return error(f"expected a MeshConfig mapping, got {type(data).__name__}", "data.mesh")
    try:
        mesh = MeshConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        return error(str(first["msg"]), field_path(tuple(first["loc"]), "data.mesh"))
    raw = data.get("discoverySelectors")
    if raw is None:
        return MeshView(mesh, None)
    if not isinstance(raw, list):
        return error("expected a list of label selectors", "data.mesh.discoverySelectors")
    if len(raw) > MAX_SELECTORS:
        return error(f"at most {MAX_SELECTORS} selectors", "data.mesh.discoverySelectors")
    selectors = []
    for i, item in enumerate(raw):
        prefix = f"data.mesh.discoverySelectors[{i}]"
        try:
            selector = LabelSelector.model_validate(item or {})
        except ValidationError as e:
            first = e.errors()[0]
            return error(str(first["msg"]), field_path(tuple(first["loc"]), prefix))
        for j, req in enumerate(selector.match_expressions):
            # Kubernetes: In/NotIn need values, Exists/DoesNotExist must have none.
            needs = req.operator in ("In", "NotIn")
            if needs != bool(req.values):
                return error(
                    f"operator {req.operator} {'needs' if needs else 'takes no'} values",
                    f"{prefix}.matchExpressions[{j}].values",
                )
        selectors.append(selector)
    return MeshView(mesh, tuple(selectors))


def _expands_beyond(doc: Any, budget: int) -> bool:
    stack = [doc]
    while stack:
        node = stack.pop()
        budget -= 1
        if budget < 0:
            return True
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False
