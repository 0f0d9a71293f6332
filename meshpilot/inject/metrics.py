"""The injector's Prometheus counters, with Istio's names (pkg/kube/inject's monitoring).

`sidecar_injection_failure_total` has a `type` label from a fixed set: `decode` (a
review that could not be used), `inject` (a pod the template cannot be applied to),
`internal` (a fault of the handler). Every failure still admits the pod.
"""

from __future__ import annotations

from prometheus_client import Counter

from meshpilot.monitoring.metrics import REGISTRY

FAILURE_TYPES = ("decode", "inject", "internal")

REQUESTS = Counter(
    "sidecar_injection_requests",
    "Total number of sidecar injection requests.",
    registry=REGISTRY,
)
SUCCESSES = Counter(
    "sidecar_injection_success",
    "Total number of successful sidecar injection requests.",
    registry=REGISTRY,
)
SKIPS = Counter(
    "sidecar_injection_skip",
    "Total number of skipped sidecar injection requests.",
    registry=REGISTRY,
)
FAILURES = Counter(
    "sidecar_injection_failure",
    "Total number of failed sidecar injection requests.",
    ["type"],
    registry=REGISTRY,
)
