"""Kubernetes objects, as the API server returns them, to store `Config` objects.

Istio's CRDs and Services go through `meshpilot.api.parse.parse_object`, the same
validation the file source uses, so an invalid object gets the same error (code and
field path) whichever way it arrived. EndpointSlices, Pods, Nodes and Namespaces are
not file-mode kinds: they are read into the models of `meshpilot.api.kube` here. Istio
keeps these in its own Kubernetes controller (pilot/pkg/serviceregistry/kube/controller)
rather than its config store; meshpilot stores them as kinds so that one snapshot
carries everything a push reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ValidationError

from meshpilot.api import kube
from meshpilot.api.errors import ConfigError, field_path
from meshpilot.api.parse import parse_object
from meshpilot.config import Config, ConfigKey, kinds
from meshpilot.discovery.kube.resource import Resource
from meshpilot.kube.names import object_name

NET = "networking.istio.io"
SEC = "security.istio.io"
# Tried in this order against what API discovery says is served.
ISTIO_VERSIONS = ("v1", "v1beta1", "v1alpha3")

ZONE_LABEL = "topology.kubernetes.io/zone"
REGION_LABEL = "topology.kubernetes.io/region"
SUBZONE_LABEL = "topology.istio.io/subzone"


@dataclass(frozen=True, slots=True)
class KindSpec:
    """One kind the Kubernetes source follows; `version` is "" for Istio CRDs until API
    discovery picked one."""

    kind: str
    group: str
    version: str
    plural: str
    namespaced: bool = True

    def resource(self, version: str | None = None) -> Resource:
        return Resource(
            self.group, version or self.version, self.plural, self.kind, self.namespaced
        )


SERVICE = KindSpec(kinds.SERVICE, "", "v1", "services")
ENDPOINT_SLICE = KindSpec(kinds.ENDPOINT_SLICE, "discovery.k8s.io", "v1", "endpointslices")
POD = KindSpec(kinds.POD, "", "v1", "pods")
NODE = KindSpec(kinds.NODE, "", "v1", "nodes", namespaced=False)
NAMESPACE = KindSpec(kinds.NAMESPACE, "", "v1", "namespaces", namespaced=False)
BUILTIN = (SERVICE, ENDPOINT_SLICE, POD, NODE)
ISTIO = (
    KindSpec(kinds.VIRTUAL_SERVICE, NET, "", "virtualservices"),
    KindSpec(kinds.DESTINATION_RULE, NET, "", "destinationrules"),
    KindSpec(kinds.GATEWAY, NET, "", "gateways"),
    KindSpec(kinds.SERVICE_ENTRY, NET, "", "serviceentries"),
    KindSpec(kinds.WORKLOAD_ENTRY, NET, "", "workloadentries"),
    KindSpec(kinds.SIDECAR, NET, "", "sidecars"),
    KindSpec(kinds.PEER_AUTHENTICATION, SEC, "", "peerauthentications"),
    KindSpec(kinds.AUTHORIZATION_POLICY, SEC, "", "authorizationpolicies"),
)


def origin_of(kind: str, obj: Mapping[str, Any], cluster_id: str) -> str:
    meta = obj.get("metadata") or {}
    return object_name(kind, str(meta.get("namespace") or ""), str(meta.get("name")), cluster_id)


def to_config(kind: str, obj: Mapping[str, Any], cluster_id: str) -> Config | ConfigError:
    """Validate one object read from the API server into a store Config."""
    origin = origin_of(kind, obj, cluster_id)
    doc = dict(obj)
    # The informer fills these in for list items; a Config needs them to be right.
    doc["kind"] = kind
    match kind:
        case kinds.ENDPOINT_SLICE:
            return _builtin(kind, doc, origin, kube.EndpointSliceSpec, _endpoint_slice(doc), {})
        case kinds.POD:
            return _builtin(kind, doc, origin, kube.PodSpec, _pod(doc), _POD_PATHS)
        case kinds.NODE:
            return _builtin(kind, doc, origin, kube.NodeSpec, _node(doc), _NODE_PATHS)
        case kinds.NAMESPACE:
            phase = (doc.get("status") or {}).get("phase") or ""
            return _builtin(
                kind, doc, origin, kube.NamespaceSpec, {"phase": phase}, {"phase": "status.phase"}
            )
    return parse_object(doc, origin)


def _builtin(
    kind: str,
    doc: Mapping[str, Any],
    origin: str,
    model: type[BaseModel],
    fields: Mapping[str, Any],
    paths: Mapping[str, str],
) -> Config | ConfigError:
    """`paths`: where each model field sits in the object, for error field paths
    (fields not named there sit at the top level, as an EndpointSlice's do)."""
    meta = doc.get("metadata") or {}
    namespace = str(meta.get("namespace") or "")
    name = str(meta.get("name") or "")

    def error(message: str, fld: str) -> ConfigError:
        return ConfigError(origin, message, None, kind, namespace, name, fld)

    if not name:
        return error("missing required field", "metadata.name")
    labels = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    for fname, mapping in (("labels", labels), ("annotations", annotations)):
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            return error("expected a map of strings", f"metadata.{fname}")
    try:
        spec = model.model_validate(fields)
    except ValidationError as e:
        first = e.errors()[0]
        loc = tuple(first["loc"])
        head = str(loc[0]) if loc else ""
        where = field_path(loc[1:], paths[head]) if head in paths else field_path(loc, "")
        return error(str(first.get("msg", "invalid value")), where)
    dump = spec.model_dump(mode="json")
    blob = json.dumps([dump, labels, annotations], sort_keys=True)
    return Config(
        key=ConfigKey(kind, namespace, name),
        spec=spec,
        labels=dict(labels),
        annotations=dict(annotations),
        creation_timestamp=_timestamp(meta.get("creationTimestamp")),
        origin=origin,
        revision=hashlib.blake2b(blob.encode(), digest_size=8).hexdigest(),
    )


_POD_PATHS = {
    "serviceAccountName": "spec.serviceAccountName",
    "nodeName": "spec.nodeName",
    "podIPs": "status.podIPs",
    "phase": "status.phase",
    "ready": "status.conditions",
    "deletionTimestamp": "metadata.deletionTimestamp",
}
_NODE_PATHS = {
    "region": f"metadata.labels[{REGION_LABEL}]",
    "zone": f"metadata.labels[{ZONE_LABEL}]",
    "subzone": f"metadata.labels[{SUBZONE_LABEL}]",
}


def _endpoint_slice(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "addressType": doc.get("addressType"),
        "endpoints": doc.get("endpoints") or [],
        "ports": doc.get("ports") or [],
    }


def _pod(doc: Mapping[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec") or {}
    status = doc.get("status") or {}
    meta = doc.get("metadata") or {}
    ips = [p.get("ip") for p in status.get("podIPs") or [] if isinstance(p, dict)]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    conditions = status.get("conditions") or []
    ready = any(
        isinstance(c, dict) and c.get("type") == "Ready" and c.get("status") == "True"
        for c in conditions
    )
    return {
        "serviceAccountName": spec.get("serviceAccountName") or "",
        "nodeName": spec.get("nodeName") or "",
        "podIPs": ips,
        "phase": status.get("phase") or "",
        "ready": ready,
        "deletionTimestamp": meta.get("deletionTimestamp") or "",
    }


def _node(doc: Mapping[str, Any]) -> dict[str, Any]:
    labels = (doc.get("metadata") or {}).get("labels") or {}
    if not isinstance(labels, dict):
        return {}
    return {
        "region": labels.get(REGION_LABEL, ""),
        "zone": labels.get(ZONE_LABEL, ""),
        "subzone": labels.get(SUBZONE_LABEL, ""),
    }


def _timestamp(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
