"""Envoy v3 type URLs and the order in which a push sends them."""

from typing import Final

CLUSTER: Final = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT: Final = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER: Final = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE: Final = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
SECRET: Final = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

# CDS before EDS before LDS before RDS: Envoy warms clusters with their endpoints
# and listeners with their routes, so sending dependents first avoids dangling refs.
PUSH_ORDER: Final = (CLUSTER, ENDPOINT, LISTENER, ROUTE, SECRET)

# Types whose SotW responses must carry the complete set (Envoy drops what is missing).
WILDCARD_TYPES: Final = frozenset({CLUSTER, LISTENER})

SHORT_NAMES: Final = {
    CLUSTER: "cds",
    ENDPOINT: "eds",
    LISTENER: "lds",
    ROUTE: "rds",
    SECRET: "sds",
}


def short(type_url: str) -> str:
    """`cds`, `eds`, ... for logs and metrics; unknown types keep their last segment."""
    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])
