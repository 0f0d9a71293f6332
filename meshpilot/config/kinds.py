"""Names of the config kinds the store holds."""

from typing import Final

SERVICE: Final = "Service"
WORKLOAD_ENTRY: Final = "WorkloadEntry"
SERVICE_ENTRY: Final = "ServiceEntry"
SIDECAR: Final = "Sidecar"
VIRTUAL_SERVICE: Final = "VirtualService"
DESTINATION_RULE: Final = "DestinationRule"
GATEWAY: Final = "Gateway"
PEER_AUTHENTICATION: Final = "PeerAuthentication"
AUTHORIZATION_POLICY: Final = "AuthorizationPolicy"
# Kubernetes objects the Kubernetes source stores as they are read (not in file mode).
ENDPOINT_SLICE: Final = "EndpointSlice"
POD: Final = "Pod"
NODE: Final = "Node"
NAMESPACE: Final = "Namespace"

ALL: Final = (
    SERVICE,
    WORKLOAD_ENTRY,
    SERVICE_ENTRY,
    SIDECAR,
    VIRTUAL_SERVICE,
    DESTINATION_RULE,
    GATEWAY,
    PEER_AUTHENTICATION,
    AUTHORIZATION_POLICY,
)

# Kinds whose changes only move endpoints: listeners, routes and clusters stay.
ENDPOINT_KINDS: Final = frozenset({WORKLOAD_ENTRY, ENDPOINT_SLICE})
