"""How a Kubernetes object is named in errors and logs: `Kind ns/name (cluster ID)`.

Istio's controllers log `namespace/name`; meshpilot adds the kind and, when it watches
more than one cluster, the cluster ID, so a message alone says which object is meant.
"""

from __future__ import annotations


def object_name(kind: str, namespace: str | None, name: str, cluster_id: str | None = None) -> str:
    """`ConfigMap istio-system/istio-ca-root-cert (Kubernetes)`; cluster-scoped: `Namespace x`."""
    ref = f"{namespace}/{name}" if namespace else name
    suffix = f" ({cluster_id})" if cluster_id else ""
    return f"{kind} {ref}{suffix}"
