"""API discovery documents, as kube-apiserver serves them without aggregated discovery:
/api (APIVersions), /api/v1 and /apis/GROUP/VERSION (APIResourceList, with /status
subresources listed as their own entries), /apis (APIGroupList, preferred version first),
/apis/GROUP (APIGroup) and /version.
"""

from __future__ import annotations

from tests.kube.objects import Obj, StatusError
from tests.kube.resources import Registry

NOT_FOUND = "the server could not find the requested resource"
VERSION = {
    "major": "1",
    "minor": "31",
    "gitVersion": "v1.31.0-meshpilot-emulator",
    # Every field kube-apiserver's version.Info carries: the client's model requires them.
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2024-08-13T00:00:00Z",
    "goVersion": "go1.22.5",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _group(group: str, versions: list[str]) -> Obj:
    entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}


def _resource_list(registry: Registry, group: str, version: str) -> Obj:
    resources: list[Obj] = []
    for rt in registry.in_group_version(group, version):
        entry: Obj = {
            "name": rt.resource,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": list(rt.verbs),
        }
        if rt.short_names:
            entry["shortNames"] = list(rt.short_names)
        resources.append(entry)
        if rt.status_subresource:
            resources.append(
                {
                    "name": f"{rt.resource}/status",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}" if group else version,
        "resources": resources,
    }


def discovery_document(registry: Registry, port: int, parts: list[str]) -> Obj:
    """The document at /`parts`; a 404 Status for anything else."""
    groups = registry.groups()
    match parts:
        case ["api"]:
            return {
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{port}"}
                ],
            }
        case ["api", "v1"]:
            return _resource_list(registry, "", "v1")
        case ["apis"]:
            return {
                "kind": "APIGroupList",
                "apiVersion": "v1",
                "groups": [_group(g, v) for g, v in groups.items()],
            }
        case ["apis", group] if group in groups:
            return {"kind": "APIGroup", "apiVersion": "v1", **_group(group, groups[group])}
        case ["apis", group, version] if version in groups.get(group, ()):
            return _resource_list(registry, group, version)
        case ["version"]:
            return dict(VERSION)
    raise StatusError(404, "NotFound", NOT_FOUND, {})
