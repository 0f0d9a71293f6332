"""Whether a pod gets a sidecar, and the JSON Patch (RFC 6902) that gives it one.

Istio's webhook configuration does the namespace selection (`istio-injection=enabled`
on the namespace, and pods labelled `sidecar.istio.io/inject=false` filtered out by
the objectSelector); the review carries only the pod, so the handler decides on the pod
alone, as Istio's `injectRequired` does with its default policy `enabled`:

- never for host-network pods (capture would rewrite the node's own routing) nor in
  Kubernetes' system namespaces;
- never for a pod already injected: one with the `sidecar.istio.io/status` annotation or
  an `istio-proxy` container (Istio re-injects such a pod; meshpilot leaves it alone,
  so a pod created from an injected manifest keeps exactly what it has);
- the pod's label `sidecar.istio.io/inject` (or, as in Istio, the older annotation of
  that name when there is no label): "false" opts out, "true" opts in; any other value is
  logged and the default applies;
- otherwise injected: the webhook configuration only sends pods it selected.

The patch adds the template's containers and volumes and Istio's
`sidecar.istio.io/status` annotation, e.g.
`{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":[...],
"imagePullSecrets":null,"revision":"default"}`. It is built from explicit `add`
operations against the pod as received (Istio diffs the pod before and after a
strategic merge instead): init containers go first, since capture must be in place
before anything else in the pod opens a connection; containers and volumes are appended.
Probes are not rewritten (Istio's `rewriteAppHTTPProbers`): the agent has no status
port to forward them, so application probes keep reaching the application directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from meshpilot.inject.template import Rendered, Template, Value

STATUS_ANNOTATION = "sidecar.istio.io/status"
INJECT_LABEL = "sidecar.istio.io/inject"
PROXY_CONTAINER = "istio-proxy"
# Istio's IgnoredNamespaces: Kubernetes' own, never given a sidecar.
IGNORED_NAMESPACES = frozenset(
    {"kube-system", "kube-public", "kube-node-lease", "local-path-storage"}
)

_TRUE = frozenset({"y", "yes", "true", "on"})
_FALSE = frozenset({"n", "no", "false", "off"})


class InjectionError(ValueError):
    """The pod cannot be injected as asked (e.g. it already uses a name the template adds)."""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The mesh-wide values the template sees (beside those taken from the pod)."""

    # The image the control plane runs (deploy/kubernetes): sidecars run the same build.
    image: str = "meshpilot:local"
    image_pull_policy: str = "IfNotPresent"
    discovery_address: str = "istiod.istio-system.svc:15012"
    ca_address: str = "istiod.istio-system.svc:15012"
    trust_domain: str = "cluster.local"
    proxy_uid: int = 1337
    proxy_gid: int = 1337
    outbound_port: int = 15001
    inbound_port: int = 15006
    exclude_inbound_ports: str = "15090,15021,15020"
    proxy_log_level: str = "warning"
    log_level: str = "info"
    revision: str = "default"


@dataclass(frozen=True, slots=True)
class Decision:
    inject: bool
    reason: str


def injection_required(pod: dict[str, Any], namespace: str) -> tuple[Decision, str | None]:
    """Whether to inject `pod`, and a warning to log for an unusable opt-in value."""
    meta = _mapping(pod.get("metadata"))
    spec = _mapping(pod.get("spec"))
    if spec.get("hostNetwork") is True:
        return Decision(False, "host network"), None
    if namespace in IGNORED_NAMESPACES:
        return Decision(False, f"system namespace {namespace}"), None
    annotations = _mapping(meta.get("annotations"))
    if STATUS_ANNOTATION in annotations:
        return Decision(False, f"already injected ({STATUS_ANNOTATION})"), None
    names = [c.get("name") for c in _list(spec.get("containers")) if isinstance(c, dict)]
    if PROXY_CONTAINER in names:
        return Decision(False, f"already injected ({PROXY_CONTAINER} container)"), None
    labels = _mapping(meta.get("labels"))
    source, value = "label", labels.get(INJECT_LABEL)
    if value is None:
        source, value = "annotation", annotations.get(INJECT_LABEL)
    if value is None:
        return Decision(True, "selected by the webhook configuration"), None
    choice = str(value).lower()
    if choice in _FALSE:
        return Decision(False, f"{source} {INJECT_LABEL}={value}"), None
    if choice in _TRUE:
        return Decision(True, f"{source} {INJECT_LABEL}={value}"), None
    warning = f"{source} {INJECT_LABEL}={str(value)[:64]!r} is neither true nor false"
    return Decision(True, "selected by the webhook configuration"), warning


def template_values(pod: dict[str, Any], namespace: str, proxy: ProxySettings) -> dict[str, Value]:
    meta = _mapping(pod.get("metadata"))
    spec = _mapping(pod.get("spec"))
    labels = {str(k): str(v) for k, v in _mapping(meta.get("labels")).items()}
    containers = [c for c in _list(spec.get("containers")) if isinstance(c, dict)]
    label_args: list[str] = []
    for key, value in sorted(labels.items()):
        label_args += ["--label", f"{key}={value}"]
    return {
        "namespace": namespace,
        "service_account": str(spec.get("serviceAccountName") or "default"),
        "canonical_name": _first(
            labels,
            ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"),
            _workload_name(meta, labels),
        ),
        "canonical_revision": _first(
            labels,
            ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"),
            "latest",
        ),
        "label_args": label_args,
        "app_container": str(containers[0].get("name", "")) if containers else "",
        "image": proxy.image,
        "image_pull_policy": proxy.image_pull_policy,
        "discovery_address": proxy.discovery_address,
        "ca_address": proxy.ca_address,
        "trust_domain": proxy.trust_domain,
        "proxy_uid": proxy.proxy_uid,
        "proxy_gid": proxy.proxy_gid,
        "outbound_port": proxy.outbound_port,
        "inbound_port": proxy.inbound_port,
        "exclude_inbound_ports": proxy.exclude_inbound_ports,
        "proxy_log_level": proxy.proxy_log_level,
        "log_level": proxy.log_level,
    }


def status_annotation(rendered: Rendered, revision: str) -> str:
    """Istio's `sidecar.istio.io/status` value: what was injected, by name."""
    return json.dumps(
        {
            "initContainers": [c["name"] for c in rendered.init_containers],
            "containers": [c["name"] for c in rendered.containers],
            "volumes": [v["name"] for v in rendered.volumes],
            "imagePullSecrets": None,
            "revision": revision,
        },
        separators=(",", ":"),
    )


def injection_patch(
    pod: dict[str, Any], namespace: str, template: Template, proxy: ProxySettings
) -> list[dict[str, Any]]:
    """The JSON Patch operations that add the rendered template to `pod`."""
    rendered = template.render(template_values(pod, namespace, proxy))
    meta = _mapping(pod.get("metadata"))
    spec = _mapping(pod.get("spec"))
    ops: list[dict[str, Any]] = []

    labels = _mapping(meta.get("labels"))
    # The pod's own labels and annotations win: a workload that set its canonical name
    # or default container meant it.
    new_labels = {k: v for k, v in rendered.labels.items() if k not in labels}
    ops += _add_to_map("/metadata/labels", meta.get("labels"), new_labels)
    annotations = _mapping(meta.get("annotations"))
    new_annotations = {k: v for k, v in rendered.annotations.items() if k not in annotations}
    new_annotations[STATUS_ANNOTATION] = status_annotation(rendered, proxy.revision)
    ops += _add_to_map("/metadata/annotations", meta.get("annotations"), new_annotations)

    ops += _add_to_list(
        "/spec/initContainers", spec.get("initContainers"), rendered.init_containers, first=True
    )
    ops += _add_to_list(
        "/spec/containers", spec.get("containers"), rendered.containers, first=False
    )
    ops += _add_to_list("/spec/volumes", spec.get("volumes"), rendered.volumes, first=False)
    return ops


def _add_to_map(path: str, current: Any, new: dict[str, str]) -> list[dict[str, Any]]:
    if not new:
        return []
    if current is None:
        return [{"op": "add", "path": path, "value": new}]
    if not isinstance(current, dict):
        raise InjectionError(f"{_field(path)}: expected a mapping")
    return [{"op": "add", "path": f"{path}/{_escape(k)}", "value": v} for k, v in new.items()]


def _add_to_list(
    path: str, current: Any, new: list[dict[str, Any]], *, first: bool
) -> list[dict[str, Any]]:
    if not new:
        return []
    if current is None or current == []:
        return [{"op": "add", "path": path, "value": new}]
    if not isinstance(current, list):
        # Replacing it would drop whatever the pod meant there.
        raise InjectionError(f"{_field(path)}: expected a list")
    taken = {
        i.get("name") for i in current if isinstance(i, dict) and isinstance(i.get("name"), str)
    }
    for item in new:
        if item["name"] in taken:
            raise InjectionError(f"{_field(path)} already has an entry named {item['name']!r}")
    if first:
        return [{"op": "add", "path": f"{path}/{i}", "value": item} for i, item in enumerate(new)]
    return [{"op": "add", "path": f"{path}/-", "value": item} for item in new]


def _field(path: str) -> str:
    """`/spec/volumes` as `spec.volumes`, the way errors name a pod's fields."""
    return path.strip("/").replace("/", ".")


def _escape(key: str) -> str:
    """A JSON Pointer reference token (RFC 6901): `~` and `/` escaped, in that order."""
    return key.replace("~", "~0").replace("/", "~1")


def _workload_name(meta: dict[str, Any], labels: dict[str, str]) -> str:
    name = meta.get("name")
    if isinstance(name, str) and name:
        return name
    generate = meta.get("generateName")
    if isinstance(generate, str) and generate:
        pod_hash = labels.get("pod-template-hash")
        if pod_hash and generate.endswith(f"-{pod_hash}-"):
            return generate[: -len(pod_hash) - 2]
        return generate.rstrip("-")
    return "unknown"


def _first(labels: dict[str, str], keys: tuple[str, ...], default: str) -> str:
    for key in keys:
        if labels.get(key):
            return labels[key]
    return default


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
