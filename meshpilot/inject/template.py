"""The sidecar template: a partial Pod in YAML, rendered with `${variable}` substitution.

Istio renders its injection template (the `sidecar` entry of the
`istio-sidecar-injector` ConfigMap) with Go's text/template, then merges the result into
the pod with a strategic merge patch. meshpilot keeps the idea (a file holding the part
of a Pod to add) but not the Go template language: the file is parsed as YAML first and
only then are `${name}` references in its string scalars replaced. A value therefore
never becomes YAML syntax, whatever a pod's labels contain, and there are no
conditionals, loops or function calls to run.

The file's shape (nothing else is accepted, so a typo is an error at startup):

    metadata:
      labels: {KEY: VALUE, ...}        # added where the pod has no such label
      annotations: {KEY: VALUE, ...}   # added where the pod has no such annotation
    spec:
      initContainers: [...]            # put before the pod's own init containers
      containers: [...]                # appended after the pod's containers
      volumes: [...]                   # appended after the pod's volumes

Substitution rules:

- A string that is exactly `${name}` becomes the variable's value with its type (an
  integer stays an integer, so `runAsUser: ${proxy_uid}` is a number).
- A list item that is exactly `${name}` of a list variable is replaced by the list's
  items (`args: [..., ${label_args}]`).
- In `command` and `args`, which Kubernetes types as lists of strings, numbers are
  written as text (`-u ${proxy_uid}` gives the argument "1337").
- `${name}` inside a longer string is replaced by the value's text; a list there is
  an error.
- Anything else is left as written: `$(POD_NAME)` is Kubernetes' own expansion of a
  container's environment in `command`/`args` and passes through untouched.
- An unknown `${name}` is an error when the template is loaded (it is rendered once
  with sample values), not when a pod is admitted.

Variables (`VARIABLES` below; values from the webhook's settings and the pod):

    namespace            the pod's namespace
    service_account      spec.serviceAccountName, else "default"
    canonical_name       Istio's canonical service: label service.istio.io/canonical-name,
                         else app.kubernetes.io/name, else app, else the workload name
    canonical_revision   label service.istio.io/canonical-revision, else
                         app.kubernetes.io/version, else version, else "latest"
    label_args           the pod's labels as the agent's `--label KEY=VALUE` arguments (list)
    app_container        the pod's first container (kubectl's default container)
    image                the image running `meshpilot` (init and sidecar containers)
    image_pull_policy    IfNotPresent unless set
    discovery_address    xDS over mutual TLS, e.g. istiod.istio-system.svc:15012
    ca_address           the CA, e.g. istiod.istio-system.svc:15012
    trust_domain         e.g. cluster.local
    proxy_uid, proxy_gid 1337: the user iptables exempts from capture
    outbound_port        15001 (iptables -p)
    inbound_port         15006 (iptables -z)
    exclude_inbound_ports  15090,15021,15020 (iptables -d)
    proxy_log_level      Envoy's log level
    log_level            the agent's log level
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

# A template is a few kilobytes; the cap keeps a wrong path (a log file, a binary)
# from being read whole.
MAX_TEMPLATE_BYTES = 256 * 1024

_REF = re.compile(r"\$\{([a-z_][a-z0-9_]*)\}")
_SPEC_LISTS = ("initContainers", "containers", "volumes")
_META_MAPS = ("labels", "annotations")
_STRING_LISTS = ("command", "args")

Value = str | int | list[str]


class TemplateError(ValueError):
    """The injection template cannot be used: names the file, the field and the reason."""


@dataclass(frozen=True, slots=True)
class Rendered:
    """What one pod gets: the template with its variables substituted."""

    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    init_containers: list[dict[str, Any]] = field(default_factory=list)
    containers: list[dict[str, Any]] = field(default_factory=list)
    volumes: list[dict[str, Any]] = field(default_factory=list)


# Every variable with a sample value of its type: the load-time trial render uses them.
VARIABLES: dict[str, Value] = {
    "namespace": "default",
    "service_account": "default",
    "canonical_name": "app",
    "canonical_revision": "latest",
    "label_args": ["--label", "app=app"],
    "app_container": "app",
    "image": "meshpilot:local",
    "image_pull_policy": "IfNotPresent",
    "discovery_address": "istiod.istio-system.svc:15012",
    "ca_address": "istiod.istio-system.svc:15012",
    "trust_domain": "cluster.local",
    "proxy_uid": 1337,
    "proxy_gid": 1337,
    "outbound_port": 15001,
    "inbound_port": 15006,
    "exclude_inbound_ports": "15090,15021,15020",
    "proxy_log_level": "warning",
    "log_level": "info",
}


class Template:
    """A loaded, checked injection template."""

    def __init__(self, doc: dict[str, Any], source: str) -> None:
        self.source = source
        self._doc = doc
        _check_shape(doc, source)
        # Unknown variables and type misuse surface now, at startup.
        self.render(VARIABLES)

    @classmethod
    def load(cls, path: Path | None = None) -> Template:
        """The file at `path`, or the template shipped in this package."""
        if path is None:
            ref = resources.files("meshpilot.inject").joinpath("template.yaml")
            return cls.parse(ref.read_text(encoding="utf-8"), "meshpilot/inject/template.yaml")
        try:
            with path.open("rb") as f:
                data = f.read(MAX_TEMPLATE_BYTES + 1)
        except OSError as e:
            raise TemplateError(f"injection template {path}: cannot read: {e.strerror}") from e
        if len(data) > MAX_TEMPLATE_BYTES:
            raise TemplateError(
                f"injection template {path}: larger than {MAX_TEMPLATE_BYTES} bytes"
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise TemplateError(f"injection template {path}: not UTF-8 text") from e
        return cls.parse(text, str(path))

    @classmethod
    def parse(cls, text: str, source: str) -> Template:
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise TemplateError(f"injection template {source}: not valid YAML: {e}") from e
        if not isinstance(doc, dict):
            raise TemplateError(f"injection template {source}: expected a mapping at the top")
        return cls(doc, source)

    def render(self, values: dict[str, Value]) -> Rendered:
        """The template with `values` substituted; TemplateError names the bad reference."""
        doc = _subst(self._doc, values, self.source, "")
        meta = doc.get("metadata") or {}
        spec = doc.get("spec") or {}
        return Rendered(
            labels={str(k): str(v) for k, v in (meta.get("labels") or {}).items()},
            annotations={str(k): str(v) for k, v in (meta.get("annotations") or {}).items()},
            init_containers=list(spec.get("initContainers") or []),
            containers=list(spec.get("containers") or []),
            volumes=list(spec.get("volumes") or []),
        )


def _check_shape(doc: dict[str, Any], source: str) -> None:
    def fail(where: str, why: str) -> TemplateError:
        return TemplateError(f"injection template {source}: {where}: {why}")

    for key in doc:
        if key not in ("metadata", "spec"):
            raise fail(str(key), "unknown field (expected metadata, spec)")
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    if not isinstance(meta, dict):
        raise fail("metadata", "expected a mapping")
    if not isinstance(spec, dict):
        raise fail("spec", "expected a mapping")
    for key, value in meta.items():
        if key not in _META_MAPS:
            raise fail(f"metadata.{key}", "unknown field (expected labels, annotations)")
        if not isinstance(value, dict) or not all(
            isinstance(v, str | int) and not isinstance(v, bool) for v in value.values()
        ):
            raise fail(f"metadata.{key}", "expected a mapping of strings")
    for key, value in spec.items():
        if key not in _SPEC_LISTS:
            raise fail(f"spec.{key}", f"unknown field (expected {', '.join(_SPEC_LISTS)})")
        if not isinstance(value, list):
            raise fail(f"spec.{key}", "expected a list")
        names: set[str] = set()
        for i, item in enumerate(value):
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or not name:
                raise fail(f"spec.{key}[{i}]", "expected a mapping with a name")
            if name in names:
                raise fail(f"spec.{key}[{i}]", f"duplicate name {name!r}")
            names.add(name)


def _subst(node: Any, values: dict[str, Value], source: str, where: str) -> Any:
    if isinstance(node, dict):
        out_map: dict[Any, Any] = {}
        for k, v in node.items():
            value = _subst(v, values, source, f"{where}.{k}" if where else str(k))
            if k in _STRING_LISTS and isinstance(value, list):
                value = [
                    str(x) if isinstance(x, int) and not isinstance(x, bool) else x for x in value
                ]
            out_map[k] = value
        return out_map
    if isinstance(node, list):
        out: list[Any] = []
        for i, item in enumerate(node):
            whole = _REF.fullmatch(item) if isinstance(item, str) else None
            value = _lookup(whole[1], values, source, where) if whole else None
            if isinstance(value, list):
                out.extend(value)
            else:
                out.append(_subst(item, values, source, f"{where}[{i}]"))
        return out
    if isinstance(node, str):
        whole = _REF.fullmatch(node)
        if whole:
            value = _lookup(whole[1], values, source, where)
            if isinstance(value, list):
                raise TemplateError(
                    f"injection template {source}: {where}: the list ${{{whole[1]}}} "
                    "can only stand as a whole list item"
                )
            return value

        def one(m: re.Match[str]) -> str:
            value = _lookup(m[1], values, source, where)
            if isinstance(value, list):
                raise TemplateError(
                    f"injection template {source}: {where}: the list ${{{m[1]}}} "
                    "cannot be part of a string"
                )
            return str(value)

        return _REF.sub(one, node)
    return node


def _lookup(name: str, values: dict[str, Value], source: str, where: str) -> Value:
    try:
        return values[name]
    except KeyError:
        known = ", ".join(sorted(VARIABLES))
        raise TemplateError(
            f"injection template {source}: {where}: unknown variable ${{{name}}} (known: {known})"
        ) from None
