"""Pods and AdmissionReviews as the API server sends them, and checks on the answers."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import jsonpatch
import kubernetes_validate

# The Kubernetes release whose OpenAPI schemas the injected pods are checked against.
KUBE_VERSION = "1.33"


def deployment_pod(**spec_extra: Any) -> dict[str, Any]:
    """A pod as a ReplicaSet creates it: generateName, pod-template-hash, no volumes yet."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "reviews-v1-7c9f8d6b5-",
            "namespace": "bookinfo",
            "labels": {
                "app": "reviews",
                "version": "v1",
                "pod-template-hash": "7c9f8d6b5",
            },
        },
        "spec": {
            "serviceAccountName": "bookinfo-reviews",
            "containers": [
                {
                    "name": "reviews",
                    "image": "docker.io/istio/examples-bookinfo-reviews-v1:1.20.2",
                    "ports": [{"containerPort": 9080, "protocol": "TCP"}],
                }
            ],
            **spec_extra,
        },
    }


def review(
    pod: Any, *, uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002", **request_extra: Any
) -> dict[str, Any]:
    """An admission.k8s.io/v1 AdmissionReview for creating `pod`."""
    meta = pod.get("metadata") if isinstance(pod, dict) else None
    namespace = meta.get("namespace", "default") if isinstance(meta, dict) else "default"
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            **request_extra,
        },
    }


def body(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def patch_ops(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The decoded JSON Patch of an AdmissionReview answer ([] without one)."""
    encoded = answer["response"].get("patch")
    if encoded is None:
        return []
    ops = json.loads(base64.b64decode(encoded, validate=True))
    assert isinstance(ops, list)
    return ops


def apply(pod: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """`ops` applied to `pod` by an independent RFC 6902 implementation."""
    result = jsonpatch.JsonPatch(ops).apply(copy.deepcopy(pod))
    assert isinstance(result, dict)
    return result


def validate_pod(pod: dict[str, Any]) -> None:
    """Raises unless `pod` is a valid v1 Pod, unknown fields included (strict schema)."""
    kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
