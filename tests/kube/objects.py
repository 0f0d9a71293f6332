"""Object semantics of the emulator: v1 Status errors, metadata rules, per-kind defaulting and
validation on create and update, JSON merge patch and JSON patch.

Follows kube-apiserver's generic registry (BeforeCreate/BeforeUpdate) and the strategies of
the kinds served, as far as a client can observe them: server-owned metadata, status reset
by the main resource when a /status subresource exists, generation on custom resources,
Service clusterIP allocation and immutability, Secret stringData folding, the
`kubernetes.io/metadata.name` label on Namespaces.
"""

from __future__ import annotations

import base64
import binascii
import copy
import ipaddress
import re
import secrets
import uuid
from datetime import UTC, datetime
from typing import Any

from tests.kube.resources import ResourceType

Obj = dict[str, Any]

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MAX_ANNOTATIONS_BYTES = 256 * 1024
_KEY_RULE = "name part must consist of alphanumeric characters, '-', '_' or '.'"
_VALUE_RULE = (
    "a valid label must be an empty string or consist of alphanumeric characters, "
    "'-', '_' or '.', at most 63 characters"
)
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")


class StatusError(Exception):
    """An error the server answers with a v1 Status object."""

    def __init__(
        self,
        code: int,
        reason: str,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def body(self) -> Obj:
        return status_body(self.code, self.reason, self.message, self.details)


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> Obj:
    body: Obj = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return body


def _details(rt: ResourceType, name: str, kind: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name}
    if rt.group:
        out["group"] = rt.group
    out["kind"] = kind or rt.resource
    return out


def not_found(rt: ResourceType, name: str) -> StatusError:
    return StatusError(404, "NotFound", f'{rt.qualified} "{name}" not found', _details(rt, name))


def namespace_not_found(name: str) -> StatusError:
    return StatusError(
        404, "NotFound", f'namespaces "{name}" not found', {"name": name, "kind": "namespaces"}
    )


def already_exists(rt: ResourceType, name: str) -> StatusError:
    return StatusError(
        409, "AlreadyExists", f'{rt.qualified} "{name}" already exists', _details(rt, name)
    )


def conflict(rt: ResourceType, name: str, why: str) -> StatusError:
    return StatusError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {rt.qualified} "{name}": {why}',
        _details(rt, name),
    )


MODIFIED = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def invalid(rt: ResourceType, name: str, causes: list[tuple[str, str, str]]) -> StatusError:
    """causes: (field, reason, message) like field.ErrorList."""
    parts = [f"{f}: {m}" for f, _, m in causes]
    joined = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    details = _details(rt, name, rt.kind)
    details["causes"] = [{"reason": r, "message": m, "field": f} for f, r, m in causes]
    return StatusError(
        422,
        "Invalid",
        f'{rt.kind}.{rt.group} "{name}" is invalid: {joined}'
        if rt.group
        else f'{rt.kind} "{name}" is invalid: {joined}',
        details,
    )


def invalid_list_options(field_name: str, message: str) -> StatusError:
    """ListOptions validation fails as 422 Invalid, like metainternalversion's validation."""
    return StatusError(
        422,
        "Invalid",
        f'ListOptions.meta.k8s.io "" is invalid: {field_name}: {message}',
        {
            "group": "meta.k8s.io",
            "kind": "ListOptions",
            "causes": [{"reason": "FieldValueForbidden", "message": message, "field": field_name}],
        },
    )


def bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- metadata --


def _validate_name(rt: ResourceType, name: str) -> list[tuple[str, str, str]]:
    if rt.resource == "namespaces":
        pattern, limit, what = _DNS1123_LABEL, 63, "a lowercase RFC 1123 label"
    elif rt.resource == "services":
        pattern, limit, what = _DNS1035_LABEL, 63, "a DNS-1035 label"
    else:
        pattern, limit, what = _DNS1123_SUBDOMAIN, 253, "a lowercase RFC 1123 subdomain"
    if len(name) > limit or not pattern.match(name):
        return [
            (
                "metadata.name",
                "FieldValueInvalid",
                f'Invalid value: "{name}": must be {what} of at most {limit} characters',
            )
        ]
    return []


def _validate_qualified_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_QUALIFIED_NAME.match(name))


def validate_metadata(rt: ResourceType, obj: Obj) -> list[tuple[str, str, str]]:
    meta: Obj = obj["metadata"]
    errors: list[tuple[str, str, str]] = []
    name = meta.get("name", "")
    if not isinstance(name, str) or not name:
        return [
            (
                "metadata.name",
                "FieldValueRequired",
                "Required value: name or generateName is required",
            )
        ]
    errors += _validate_name(rt, name)
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        errors.append(("metadata.labels", "FieldValueTypeInvalid", "Invalid value: must be a map"))
    else:
        for key, value in labels.items():
            if not _validate_qualified_key(key):
                errors.append(
                    (
                        "metadata.labels",
                        "FieldValueInvalid",
                        f'Invalid value: "{key}": {_KEY_RULE}',
                    )
                )
            if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
                errors.append(
                    (
                        "metadata.labels",
                        "FieldValueInvalid",
                        f'Invalid value: "{value}": {_VALUE_RULE}',
                    )
                )
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(v, str) for v in annotations.values()
    ):
        errors.append(
            (
                "metadata.annotations",
                "FieldValueTypeInvalid",
                "Invalid value: must be a map of strings",
            )
        )
    else:
        size = sum(len(k) + len(v) for k, v in annotations.items())
        if size > MAX_ANNOTATIONS_BYTES:
            errors.append(
                (
                    "metadata.annotations",
                    "FieldValueTooLong",
                    f"Too long: must have at most {MAX_ANNOTATIONS_BYTES} bytes",
                )
            )
        for key in annotations:
            if not _validate_qualified_key(key):
                errors.append(
                    (
                        "metadata.annotations",
                        "FieldValueInvalid",
                        f'Invalid value: "{key}": {_KEY_RULE}',
                    )
                )
    return errors


def check_body_type(rt: ResourceType, version: str, obj: Any) -> Obj:
    """The decoded body must be an object of this kind in this group/version."""
    if not isinstance(obj, dict):
        raise bad_request("the body of the request must be a JSON object")
    expected = rt.api_version(version)
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if rt.custom and (not api_version or not kind):
        raise bad_request(f"Object 'Kind' is missing in '{str(obj)[:200]}'")
    if api_version is not None and api_version != expected:
        raise bad_request(
            f"the API version in the data ({api_version}) does not match the expected API "
            f"version ({expected})"
        )
    if kind is not None and kind != rt.kind:
        raise bad_request(
            f"the kind in the data ({kind}) does not match the expected kind ({rt.kind})"
        )
    meta = obj.get("metadata")
    if meta is None:
        obj["metadata"] = {}
    elif not isinstance(meta, dict):
        raise bad_request("metadata: must be an object")
    return obj


def strip_type(obj: Obj) -> Obj:
    """Objects are stored without apiVersion/kind: each served version renders its own."""
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}


def ensure_namespace(rt: ResourceType, obj: Obj, namespace: str) -> None:
    meta = obj["metadata"]
    given = meta.get("namespace") or ""
    if not rt.namespaced:
        meta.pop("namespace", None)
    elif not given:
        meta["namespace"] = namespace
    elif given != namespace:
        raise bad_request(
            "the namespace of the provided object does not match the namespace sent on the request"
        )


# -- per-kind rules --


class ClusterIPAllocator:
    def __init__(self) -> None:
        self._next = int(SERVICE_CIDR.network_address) + 10
        self.allocated: set[str] = set()

    def allocate(self) -> str:
        while True:
            ip = str(ipaddress.ip_address(self._next))
            self._next += 1
            if ip not in self.allocated:
                self.allocated.add(ip)
                return ip


def _decode_base64_map(rt: ResourceType, field_name: str, data: Any) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise bad_request(f"{rt.kind}.{field_name}: expected a map of base64 strings")
    for key, value in data.items():
        try:
            if not isinstance(value, str):
                raise ValueError("not a string")
            base64.b64decode(value, validate=True)
        except (ValueError, binascii.Error) as exc:
            raise bad_request(
                f'{rt.kind} in version "v1" cannot be handled as a {rt.kind}: illegal base64 '
                f"data in {field_name}[{key!r}]: {exc}"
            ) from None


def _service_defaults(
    obj: Obj, old: Obj | None, ips: ClusterIPAllocator, name: str, rt: ResourceType
) -> None:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        raise bad_request("Service.spec: expected an object")
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    ports = spec.get("ports") or []
    for i, port in enumerate(ports):
        number = port.get("port")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            raise invalid(
                rt,
                name,
                [
                    (
                        f"spec.ports[{i}].port",
                        "FieldValueInvalid",
                        f"Invalid value: {number}: must be between 1 and 65535, inclusive",
                    )
                ],
            )
        port.setdefault("protocol", "TCP")
        port.setdefault("targetPort", number)
    if len(ports) > 1 and any(not p.get("name") for p in ports):
        raise invalid(rt, name, [("spec.ports[0].name", "FieldValueRequired", "Required value")])
    if spec["type"] == "ExternalName":
        return
    old_ip = (old or {}).get("spec", {}).get("clusterIP")
    ip = spec.get("clusterIP")
    if old_ip and not ip:
        # PUT without the allocated address keeps it, as the real server does.
        spec["clusterIP"] = ip = old_ip
    if old_ip and ip != old_ip:
        raise invalid(
            rt,
            name,
            [
                (
                    "spec.clusterIPs[0]",
                    "FieldValueInvalid",
                    f'Invalid value: "{ip}": may not change once set',
                )
            ],
        )
    if ip != "None" and not ports:
        raise invalid(rt, name, [("spec.ports", "FieldValueRequired", "Required value")])
    if not ip:
        ip = spec["clusterIP"] = ips.allocate()
    elif ip != "None" and old is None:
        ips.allocated.add(ip)
    spec["clusterIPs"] = [ip]
    spec.setdefault("ipFamilies", ["IPv4"])
    spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")


def _kind_rules(rt: ResourceType, obj: Obj, old: Obj | None, ips: ClusterIPAllocator) -> None:
    name = obj["metadata"]["name"]
    if rt.group == "" and rt.resource == "namespaces":
        obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    elif rt.group == "" and rt.resource == "services":
        _service_defaults(obj, old, ips, name, rt)
    elif rt.group == "" and rt.resource == "secrets":
        obj.setdefault("type", "Opaque")
        _decode_base64_map(rt, "data", obj.get("data"))
        string_data = obj.pop("stringData", None)
        if string_data:
            data = obj.setdefault("data", {})
            for key, value in string_data.items():
                data[key] = base64.b64encode(str(value).encode()).decode()
    elif rt.group == "" and rt.resource == "configmaps":
        data = obj.get("data")
        if data is not None and (
            not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values())
        ):
            raise bad_request(
                'ConfigMap in version "v1" cannot be handled as a ConfigMap: '
                "data values must be strings"
            )
        _decode_base64_map(rt, "binaryData", obj.get("binaryData"))
    elif rt.group == "" and rt.resource == "pods":
        if not (obj.get("spec") or {}).get("containers"):
            raise invalid(rt, name, [("spec.containers", "FieldValueRequired", "Required value")])
    elif rt.group == "coordination.k8s.io":
        _lease_rules(rt, obj.get("spec"))
    elif rt.group == "discovery.k8s.io":
        if not obj.get("addressType"):
            raise invalid(rt, name, [("addressType", "FieldValueRequired", "Required value")])
        # The Go type has no omitempty: an absent list is served as null.
        obj.setdefault("endpoints", None)


# metav1.MicroTime is parsed with Go's RFC3339Micro layout: exactly six fractional digits.
_MICRO_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})")


def _lease_rules(rt: ResourceType, spec: Any) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict):
        raise bad_request("Lease.spec: expected an object")
    for field_name in ("acquireTime", "renewTime"):
        value = spec.get(field_name)
        if value is not None and not (isinstance(value, str) and _MICRO_TIME.fullmatch(value)):
            raise bad_request(
                f'Lease in version "v1" cannot be handled as a Lease: parsing time {value!r} '
                f'as "2006-01-02T15:04:05.000000Z07:00": cannot parse'
            )
    for field_name in ("leaseDurationSeconds", "leaseTransitions"):
        value = spec.get(field_name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise bad_request(
                f'Lease in version "v1" cannot be handled as a Lease: spec.{field_name}: '
                "expected an integer"
            )


_CREATE_STATUS: dict[str, Obj] = {
    "namespaces": {"phase": "Active"},
    "pods": {"phase": "Pending", "qosClass": "BestEffort"},
    "services": {"loadBalancer": {}},
}


def prepare_create(
    rt: ResourceType, obj: Obj, ips: ClusterIPAllocator, generate_suffix: str | None = None
) -> Obj:
    meta = obj["metadata"]
    if meta.get("resourceVersion"):
        raise bad_request("resourceVersion should not be set on objects to be created")
    if not meta.get("name") and meta.get("generateName"):
        meta["name"] = meta["generateName"] + (generate_suffix or secrets.token_hex(3)[:5])
    errors = validate_metadata(rt, obj)
    if errors:
        raise invalid(rt, meta.get("name", ""), errors)
    for server_owned in (
        "uid",
        "selfLink",
        "managedFields",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ):
        meta.pop(server_owned, None)
    meta["uid"] = str(uuid.uuid4())
    meta["creationTimestamp"] = now_rfc3339()
    if rt.tracks_generation:
        meta["generation"] = 1
    if rt.status_subresource:
        if rt.custom:
            obj.pop("status", None)
        elif rt.resource in _CREATE_STATUS:
            obj["status"] = copy.deepcopy(_CREATE_STATUS[rt.resource])
    _kind_rules(rt, obj, None, ips)
    return obj


def _non_metadata(obj: Obj) -> Obj:
    return {k: v for k, v in obj.items() if k != "metadata"}


def prepare_update(
    rt: ResourceType, new: Obj, old: Obj, subresource: str, ips: ClusterIPAllocator
) -> Obj:
    if subresource == "status":
        # A status write changes status only; everything else stays as stored.
        out = copy.deepcopy(old)
        if "status" in new:
            out["status"] = new["status"]
        else:
            out.pop("status", None)
        return out
    errors = validate_metadata(rt, new)
    if errors:
        raise invalid(rt, new["metadata"].get("name", ""), errors)
    meta, old_meta = new["metadata"], old["metadata"]
    for owned in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
        if owned in old_meta:
            meta[owned] = old_meta[owned]
        else:
            meta.pop(owned, None)
    meta.pop("managedFields", None)
    meta.pop("selfLink", None)
    if rt.status_subresource:
        if "status" in old:
            new["status"] = copy.deepcopy(old["status"])
        else:
            new.pop("status", None)
    _kind_rules(rt, new, old, ips)
    changed = _non_metadata(new) != _non_metadata(old)
    if rt.resource == "endpointslices":
        # The EndpointSlice strategy counts label changes too.
        changed = changed or meta.get("labels") != old_meta.get("labels")
    if rt.tracks_generation and changed:
        meta["generation"] = int(old_meta.get("generation", 1)) + 1
    return new


def same_content(a: Obj, b: Obj) -> bool:
    """True when an update would store nothing new (etcd then keeps the revision)."""

    def strip(o: Obj) -> Obj:
        return {
            **o,
            "metadata": {k: v for k, v in o["metadata"].items() if k != "resourceVersion"},
        }

    return strip(a) == strip(b)
