"""The REST verbs on stored objects, independent of HTTP: list, get, create, update, patch,
delete, deletecollection and TokenReview, each raising StatusError the way kube-apiserver
answers.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.kube import objects
from tests.kube import patch as patch_mod
from tests.kube.objects import Obj, StatusError, bad_request
from tests.kube.resources import ResourceType
from tests.kube.selectors import SelectorError, field_matcher, label_matcher
from tests.kube.store import Expired, ObjKey, Store, sort_key

CONTINUE_EXPIRED = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter."
)
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
PATCH_TYPES = (JSON_PATCH, MERGE_PATCH)


_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"", "0", "f", "F", "false", "FALSE", "False"}


def parse_bool(query: Mapping[str, str], name: str) -> bool:
    value = query.get(name, "")
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise bad_request(f'{name}: Invalid value: "{value}": strconv.ParseBool: invalid syntax')


def parse_int(query: Mapping[str, str], name: str) -> int:
    value = query.get(name, "")
    if not value:
        return 0
    try:
        return int(value)
    except ValueError:
        raise bad_request(
            f'{name}: Invalid value: "{value}": strconv.ParseInt: invalid syntax'
        ) from None


def render(rt: ResourceType, version: str, obj: Obj, with_type: bool = True) -> Obj:
    body = copy.deepcopy(obj)
    if not with_type:
        return body
    return {"apiVersion": rt.api_version(version), "kind": rt.kind, **body}


def expired(message: str) -> StatusError:
    return StatusError(410, "Expired", message)


def parse_rv(value: str, what: str = "resourceVersion") -> int:
    try:
        rv = int(value)
    except ValueError:
        raise bad_request(f"{what}: Invalid value: {value!r}: must be an integer") from None
    if rv < 0:
        raise bad_request(f"{what}: Invalid value: {value!r}: must be non-negative")
    return rv


def encode_continue(rv: int, last: str) -> str:
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": last + "\x00"})
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_continue(token: str) -> tuple[int, str]:
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        if data.get("v") != "meta.k8s.io/v1":
            raise ValueError("unknown version")
        rv, start = int(data["rv"]), str(data["start"])
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise bad_request(f"continue key is not valid: {exc}") from None
    return rv, start


@dataclass
class Selection:
    namespace: str
    labels: Callable[[Mapping[str, str]], bool]
    fields: Callable[[Mapping[str, Any]], bool]
    filtered: bool

    def matches(self, key: ObjKey, obj: Obj) -> bool:
        if self.namespace and key[0] != self.namespace:
            return False
        return self.labels(obj["metadata"].get("labels") or {}) and self.fields(obj)


def selection(rt: ResourceType, namespace: str, query: Mapping[str, str]) -> Selection:
    label_sel, field_sel = query.get("labelSelector", ""), query.get("fieldSelector", "")

    def unsupported(name: str) -> str:
        if rt.custom:
            return (
                f'"{name}" is not a known field selector: '
                'only "metadata.name", "metadata.namespace"'
            )
        return f"field label not supported: {name}"

    try:
        return Selection(
            namespace,
            label_matcher(label_sel),
            field_matcher(field_sel, rt.field_selectors, unsupported),
            bool(label_sel.strip() or field_sel.strip()),
        )
    except SelectorError as exc:
        raise bad_request(str(exc)) from None


@dataclass
class ServiceAccountToken:
    namespace: str
    name: str
    uid: str
    audiences: tuple[str, ...]


@dataclass
class Rest:
    store: Store
    namespaces_rt: ResourceType
    all_types: Sequence[ResourceType]
    api_audiences: tuple[str, ...]
    too_large_rv_wait: float = 3.0
    ips: objects.ClusterIPAllocator = field(default_factory=objects.ClusterIPAllocator)
    sa_tokens: dict[str, ServiceAccountToken] = field(default_factory=dict)

    # -- reads --

    def get(self, rt: ResourceType, version: str, namespace: str, name: str) -> Obj:
        obj = self.store.get(rt.group_resource, (namespace, name))
        if obj is None:
            raise objects.not_found(rt, name)
        return render(rt, version, obj)

    async def _wait_rv(self, rv: int) -> None:
        if not await self.store.wait_for_rv(rv, self.too_large_rv_wait):
            raise StatusError(
                504,
                "Timeout",
                f"Too large resource version: {rv}, current: {self.store.rv}",
                {
                    "causes": [
                        {
                            "reason": "ResourceVersionTooLarge",
                            "message": "Too large resource version",
                        }
                    ],
                    "retryAfterSeconds": 1,
                },
            )

    async def list(
        self, rt: ResourceType, version: str, namespace: str, query: Mapping[str, str], limit: int
    ) -> Obj:
        sel = selection(rt, namespace, query)
        rv_param = query.get("resourceVersion", "")
        match = query.get("resourceVersionMatch", "")
        token = query.get("continue", "")
        if match not in ("", "Exact", "NotOlderThan"):
            raise objects.invalid_list_options(
                "resourceVersionMatch", f'Unsupported value: "{match}"'
            )
        if match and not rv_param:
            raise objects.invalid_list_options(
                "resourceVersionMatch",
                "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            )
        start = ""
        if token:
            if rv_param or match:
                raise bad_request("specifying resource version is not allowed when using continue")
            at, start = decode_continue(token)
        elif match == "Exact":
            at = parse_rv(rv_param)
            if at == 0:
                raise objects.invalid_list_options(
                    "resourceVersionMatch",
                    'Forbidden: resourceVersionMatch "exact" is forbidden for resourceVersion "0"',
                )
            await self._wait_rv(at)
        else:
            if rv_param and rv_param != "0":
                await self._wait_rv(parse_rv(rv_param))
            at = self.store.rv
            if rv_param == "0" and not match:
                # Served from the watch cache, which answers whole lists and ignores limit.
                limit = 0
        try:
            snapshot = self.store.snapshot(rt.group_resource, at)
        except Expired as exc:
            raise expired(CONTINUE_EXPIRED if token else str(exc)) from None
        items = [(k, o) for k, o in snapshot if sel.matches(k, o) and sort_key(k) >= start]
        meta: Obj = {"resourceVersion": str(at)}
        if limit and len(items) > limit:
            meta["continue"] = encode_continue(at, sort_key(items[limit - 1][0]))
            if not sel.filtered:
                meta["remainingItemCount"] = len(items) - limit
            items = items[:limit]
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version(version),
            "metadata": meta,
            # Built-in lists carry items without apiVersion/kind; custom resources keep them.
            "items": [render(rt, version, o, with_type=rt.custom) for _, o in items],
        }

    # -- writes --

    def _namespace_exists(self, rt: ResourceType, namespace: str) -> None:
        if (
            rt.namespaced
            and self.store.get(self.namespaces_rt.group_resource, ("", namespace)) is None
        ):
            raise objects.namespace_not_found(namespace)

    def create(
        self, rt: ResourceType, version: str, namespace: str, body: Any, dry_run: bool = False
    ) -> Obj:
        obj = objects.strip_type(objects.check_body_type(rt, version, body))
        objects.ensure_namespace(rt, obj, namespace)
        if rt.resource == "tokenreviews":
            return self.token_review(rt, version, obj)
        self._namespace_exists(rt, namespace)
        obj = objects.prepare_create(rt, obj, self.ips)
        key = (namespace if rt.namespaced else "", obj["metadata"]["name"])
        if self.store.get(rt.group_resource, key) is not None:
            raise objects.already_exists(rt, key[1])
        if dry_run:
            return render(rt, version, obj)
        stored, _ = self.store.put(rt.group_resource, key, obj)
        return render(rt, version, stored)

    def update(
        self,
        rt: ResourceType,
        version: str,
        namespace: str,
        name: str,
        body: Any,
        subresource: str = "",
        dry_run: bool = False,
        conditional: bool = True,
    ) -> tuple[int, Obj]:
        obj = objects.strip_type(objects.check_body_type(rt, version, body))
        given = obj["metadata"].get("name", "")
        if given != name:
            raise bad_request(
                f"the name of the object ({given}) does not match the name on the URL ({name})"
            )
        objects.ensure_namespace(rt, obj, namespace)
        key = (namespace if rt.namespaced else "", name)
        old = self.store.get(rt.group_resource, key)
        if old is None:
            if subresource or not rt.create_on_update:
                raise objects.not_found(rt, name)
            if obj["metadata"].get("resourceVersion"):
                raise objects.conflict(rt, name, "the object does not exist")
            return 201, self.create(rt, version, namespace, body, dry_run)
        rv = obj["metadata"].get("resourceVersion")
        if not rv:
            if conditional and not rt.unconditional_update:
                raise objects.invalid(
                    rt,
                    name,
                    [
                        (
                            "metadata.resourceVersion",
                            "FieldValueInvalid",
                            "Invalid value: 0x0: must be specified for an update",
                        )
                    ],
                )
        elif rv != old["metadata"]["resourceVersion"]:
            raise objects.conflict(rt, name, objects.MODIFIED)
        uid = obj["metadata"].get("uid")
        if uid and uid != old["metadata"]["uid"]:
            raise objects.conflict(
                rt,
                name,
                f"Precondition failed: UID in precondition: {uid}, "
                f"UID in object meta: {old['metadata']['uid']}",
            )
        new = objects.prepare_update(rt, obj, old, subresource, self.ips)
        if objects.same_content(new, old) or dry_run:
            return 200, render(rt, version, new if dry_run else old)
        stored, _ = self.store.put(rt.group_resource, key, new)
        return 200, render(rt, version, stored)

    def patch(
        self,
        rt: ResourceType,
        version: str,
        namespace: str,
        name: str,
        content_type: str,
        patch: Any,
        subresource: str = "",
        dry_run: bool = False,
    ) -> Obj:
        key = (namespace if rt.namespaced else "", name)
        old = self.store.get(rt.group_resource, key)
        if old is None:
            raise objects.not_found(rt, name)
        current = render(rt, version, old)
        if content_type == MERGE_PATCH:
            if not isinstance(patch, dict):
                raise bad_request("a merge patch must be a JSON object")
            patched = patch_mod.merge_patch(current, patch)
        else:
            if not isinstance(patch, list):
                raise bad_request(
                    "json: cannot unmarshal object into Go value of type jsonpatch.Patch"
                )
            try:
                patched = patch_mod.json_patch(current, patch)
            except patch_mod.PatchError as exc:
                raise StatusError(
                    422,
                    "Invalid",
                    f"the server rejected our request due to an error in our request: {exc}",
                ) from None
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise bad_request("the patched object must be a JSON object with metadata")
        if patched["metadata"].get("namespace", key[0] or None) != (key[0] or None):
            raise bad_request("the namespace of the object does not match the namespace on the URL")
        # Without a resourceVersion in the patch, a patch applies to whatever is stored now.
        _, out = self.update(
            rt, version, namespace, name, patched, subresource, dry_run, conditional=False
        )
        return out

    def delete(
        self, rt: ResourceType, version: str, namespace: str, name: str, options: Any, dry_run: bool
    ) -> Obj:
        key = (namespace if rt.namespaced else "", name)
        old = self.store.get(rt.group_resource, key)
        if old is None:
            raise objects.not_found(rt, name)
        pre = (options or {}).get("preconditions") or {} if isinstance(options, dict) else {}
        for what, field_name in (("UID", "uid"), ("ResourceVersion", "resourceVersion")):
            want = pre.get(field_name)
            have = old["metadata"].get(field_name)
            if want and want != have:
                raise objects.conflict(
                    rt,
                    name,
                    f"Precondition failed: {what} in precondition: {want}, "
                    f"{what} in object meta: {have}",
                )
        if dry_run:
            tomb = old
        else:
            if rt is self.namespaces_rt:
                self._delete_namespace_contents(name)
            tomb = self.store.delete(rt.group_resource, key) or old
        if rt.returns_deleted_object:
            return render(rt, version, tomb)
        details: Obj = {"name": name, "kind": rt.resource, "uid": old["metadata"]["uid"]}
        if rt.group:
            details["group"] = rt.group
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }

    def _delete_namespace_contents(self, namespace: str) -> None:
        for other in self.all_types:
            if other.namespaced:
                for key in [k for k in self.store.items(other.group_resource) if k[0] == namespace]:
                    self.store.delete(other.group_resource, key)

    def delete_collection(
        self,
        rt: ResourceType,
        version: str,
        namespace: str,
        query: Mapping[str, str],
        dry_run: bool,
    ) -> Obj:
        sel = selection(rt, namespace, query)
        doomed = [
            (k, o)
            for k, o in self.store.snapshot(rt.group_resource, self.store.rv)
            if sel.matches(k, o)
        ]
        deleted = []
        for key, obj in doomed:
            if rt is self.namespaces_rt and not dry_run:
                self._delete_namespace_contents(key[1])
            deleted.append(obj if dry_run else self.store.delete(rt.group_resource, key) or obj)
        return {
            "kind": f"{rt.kind}List",
            "apiVersion": rt.api_version(version),
            "metadata": {"resourceVersion": str(self.store.rv)},
            "items": [render(rt, version, o, with_type=rt.custom) for o in deleted],
        }

    # -- TokenReview --

    def add_token(
        self, namespace: str, name: str, audiences: Sequence[str], token: str | None
    ) -> str:
        token = token or secrets.token_urlsafe(32)
        self.sa_tokens[token] = ServiceAccountToken(
            namespace, name, f"sa-uid-{namespace}-{name}", tuple(audiences or self.api_audiences)
        )
        return token

    def token_review(self, rt: ResourceType, version: str, obj: Obj) -> Obj:
        spec = obj.get("spec")
        if not isinstance(spec, dict) or not spec.get("token"):
            raise bad_request("token is required for TokenReview in authentication")
        requested = spec.get("audiences") or []
        if not isinstance(requested, list) or not all(isinstance(a, str) for a in requested):
            raise bad_request("spec.audiences: must be a list of strings")
        targets = list(requested) or list(self.api_audiences)
        entry = self.sa_tokens.get(spec["token"])
        status: Obj = {"user": {}}
        if entry is None:
            status["error"] = "[invalid bearer token, token lookup failed]"
        else:
            common = [a for a in targets if a in entry.audiences]
            if not common:
                status["error"] = (
                    f"[invalid bearer token, token audiences {json.dumps(list(entry.audiences))} "
                    f"is invalid for the target audiences {json.dumps(targets)}]"
                )
            else:
                status = {
                    "authenticated": True,
                    "user": {
                        "username": f"system:serviceaccount:{entry.namespace}:{entry.name}",
                        "uid": entry.uid,
                        "groups": [
                            "system:serviceaccounts",
                            f"system:serviceaccounts:{entry.namespace}",
                            "system:authenticated",
                        ],
                    },
                    "audiences": common,
                }
        return {
            "kind": rt.kind,
            "apiVersion": rt.api_version(version),
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }
