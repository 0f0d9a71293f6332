"""The resource types the emulator serves, with the per-kind rules of the real registry.

Each entry mirrors what kube-apiserver's registry strategy for that kind says: namespaced or
not, whether it has a /status subresource, whether PUT without metadata.resourceVersion is
accepted (AllowUnconditionalUpdate), whether PUT may create (AllowCreateOnUpdate), which field
selectors it supports, and what DELETE answers with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

STANDARD_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")
META_FIELDS = frozenset({"metadata.name", "metadata.namespace"})

ISTIO_NETWORKING = "networking.istio.io"
ISTIO_SECURITY = "security.istio.io"
# Versions in preference order (the first served one is the preferred version).
ISTIO_VERSIONS: dict[str, tuple[str, ...]] = {
    ISTIO_NETWORKING: ("v1", "v1beta1", "v1alpha3"),
    ISTIO_SECURITY: ("v1", "v1beta1"),
}


@dataclass(frozen=True)
class ResourceType:
    group: str  # "" is the core (legacy) group served under /api
    versions: tuple[str, ...]
    resource: str  # plural, as in the URL
    singular: str
    kind: str
    namespaced: bool = True
    verbs: tuple[str, ...] = STANDARD_VERBS
    short_names: tuple[str, ...] = ()
    status_subresource: bool = False
    custom: bool = False  # served from a CustomResourceDefinition
    unconditional_update: bool = True
    create_on_update: bool = False
    # The real server returns the deleted object for these, a Status for the rest.
    returns_deleted_object: bool = False
    # metadata.generation starts at 1 and counts spec changes (CRDs, EndpointSlices).
    tracks_generation: bool = False
    extra_fields: frozenset[str] = field(default_factory=frozenset)

    @property
    def group_resource(self) -> tuple[str, str]:
        return (self.group, self.resource)

    @property
    def qualified(self) -> str:
        """`services` or `leases.coordination.k8s.io`, as in error messages."""
        return f"{self.resource}.{self.group}" if self.group else self.resource

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version

    @property
    def field_selectors(self) -> frozenset[str]:
        return META_FIELDS | self.extra_fields


def builtin_types() -> list[ResourceType]:
    v1 = ("v1",)
    return [
        ResourceType(
            "",
            v1,
            "namespaces",
            "namespace",
            "Namespace",
            namespaced=False,
            short_names=("ns",),
            status_subresource=True,
            returns_deleted_object=True,
            extra_fields=frozenset({"status.phase"}),
        ),
        ResourceType(
            "",
            v1,
            "services",
            "service",
            "Service",
            short_names=("svc",),
            status_subresource=True,
            create_on_update=True,
            returns_deleted_object=True,
        ),
        ResourceType(
            "",
            v1,
            "pods",
            "pod",
            "Pod",
            short_names=("po",),
            status_subresource=True,
            returns_deleted_object=True,
            extra_fields=frozenset(
                {
                    "spec.nodeName",
                    "spec.restartPolicy",
                    "spec.schedulerName",
                    "spec.serviceAccountName",
                    "spec.hostNetwork",
                    "status.phase",
                    "status.podIP",
                    "status.nominatedNodeName",
                }
            ),
        ),
        ResourceType(
            "",
            v1,
            "nodes",
            "node",
            "Node",
            namespaced=False,
            short_names=("no",),
            status_subresource=True,
            extra_fields=frozenset({"spec.unschedulable"}),
        ),
        ResourceType("", v1, "configmaps", "configmap", "ConfigMap", short_names=("cm",)),
        ResourceType("", v1, "secrets", "secret", "Secret", extra_fields=frozenset({"type"})),
        ResourceType(
            "",
            v1,
            "serviceaccounts",
            "serviceaccount",
            "ServiceAccount",
            short_names=("sa",),
            create_on_update=True,
            returns_deleted_object=True,
        ),
        ResourceType(
            "discovery.k8s.io",
            v1,
            "endpointslices",
            "endpointslice",
            "EndpointSlice",
            tracks_generation=True,
        ),
        ResourceType(
            "coordination.k8s.io",
            v1,
            "leases",
            "lease",
            "Lease",
            unconditional_update=False,
            create_on_update=True,
        ),
        # Read-only here: the CRDs behind the Istio kinds, so a client can check which
        # versions a cluster serves the way it would against a real one.
        ResourceType(
            "apiextensions.k8s.io",
            v1,
            "customresourcedefinitions",
            "customresourcedefinition",
            "CustomResourceDefinition",
            namespaced=False,
            verbs=("get", "list", "watch"),
            short_names=("crd", "crds"),
            status_subresource=True,
        ),
        # The sidecar injector's configuration, whose caBundle the control plane keeps.
        ResourceType(
            "admissionregistration.k8s.io",
            v1,
            "mutatingwebhookconfigurations",
            "mutatingwebhookconfiguration",
            "MutatingWebhookConfiguration",
            namespaced=False,
            tracks_generation=True,
        ),
        ResourceType(
            "authentication.k8s.io",
            v1,
            "tokenreviews",
            "tokenreview",
            "TokenReview",
            namespaced=False,
            verbs=("create",),
        ),
    ]


_ISTIO_KINDS: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {
    ISTIO_NETWORKING: [
        ("virtualservices", "VirtualService", ("vs",)),
        ("destinationrules", "DestinationRule", ("dr",)),
        ("gateways", "Gateway", ("gw",)),
        ("serviceentries", "ServiceEntry", ("se",)),
        ("workloadentries", "WorkloadEntry", ("we",)),
        ("sidecars", "Sidecar", ()),
    ],
    ISTIO_SECURITY: [
        ("peerauthentications", "PeerAuthentication", ("pa",)),
        ("authorizationpolicies", "AuthorizationPolicy", ("ap",)),
        ("requestauthentications", "RequestAuthentication", ("ra",)),
    ],
}


def istio_types(served: Mapping[str, Sequence[str]] | None = None) -> list[ResourceType]:
    """Istio's CRDs, each served in `served[group]` (default: every version Istio defines)."""
    out = []
    for group, kinds in _ISTIO_KINDS.items():
        known = ISTIO_VERSIONS[group]
        versions = tuple(served[group]) if served and group in served else known
        unknown = [v for v in versions if v not in known]
        if unknown:
            raise ValueError(f"served_versions[{group!r}]: {unknown} not among {list(known)}")
        if not versions:
            continue
        for resource, kind, short in kinds:
            out.append(
                ResourceType(
                    group,
                    versions,
                    resource,
                    kind.lower(),
                    kind,
                    short_names=short,
                    status_subresource=True,
                    custom=True,
                    unconditional_update=False,
                    tracks_generation=True,
                )
            )
    return out


class Registry:
    """Lookup of resource types by URL (group, version, resource)."""

    def __init__(self, types: Sequence[ResourceType]) -> None:
        self.types = list(types)
        self._by_gvr = {(t.group, v, t.resource): t for t in types for v in t.versions}
        self._by_gr = {t.group_resource: t for t in types}

    def lookup(self, group: str, version: str, resource: str) -> ResourceType | None:
        return self._by_gvr.get((group, version, resource))

    def by_group_resource(self, group: str, resource: str) -> ResourceType | None:
        return self._by_gr.get((group, resource))

    def groups(self) -> dict[str, list[str]]:
        """Group name -> served versions in preference order (core group excluded)."""
        out: dict[str, list[str]] = {}
        for t in self.types:
            if t.group:
                versions = out.setdefault(t.group, [])
                versions.extend(v for v in t.versions if v not in versions)
        return out

    def in_group_version(self, group: str, version: str) -> list[ResourceType]:
        return [t for t in self.types if t.group == group and version in t.versions]


def crd_for(rt: ResourceType) -> tuple[dict[str, object], dict[str, object]]:
    """The CustomResourceDefinition (object, status) that serves `rt`."""
    group_label = rt.group.replace(".", "-")
    names: dict[str, object] = {
        "kind": rt.kind,
        "listKind": f"{rt.kind}List",
        "plural": rt.resource,
        "singular": rt.singular,
        "categories": ["istio-io", group_label],
    }
    if rt.short_names:
        names["shortNames"] = list(rt.short_names)
    versions = [
        {
            "name": version,
            "served": True,
            "storage": i == 0,
            "schema": {
                "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
            },
            "subresources": {"status": {}},
        }
        for i, version in enumerate(rt.versions)
    ]
    obj: dict[str, object] = {
        "metadata": {"name": f"{rt.resource}.{rt.group}", "labels": {"app": "istio-pilot"}},
        "spec": {
            "group": rt.group,
            "names": names,
            "scope": "Namespaced" if rt.namespaced else "Cluster",
            "versions": versions,
        },
    }
    status: dict[str, object] = {
        "acceptedNames": names,
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts"},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted"},
        ],
        "storedVersions": [rt.versions[0]],
    }
    return obj, status
