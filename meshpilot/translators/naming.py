"""Istio's names for Envoy resources, so config dumps and tooling read the same.

Clusters `outbound|PORT|SUBSET|FQDN` and `inbound|PORT||`, SNI
`outbound_.PORT_.SUBSET_.FQDN`, listeners `BIND_PORT`, routes named by port.
"""

from __future__ import annotations

from typing import Literal

OUTBOUND: Literal["outbound"] = "outbound"
INBOUND: Literal["inbound"] = "inbound"
Direction = Literal["outbound", "inbound"]

BLACKHOLE_CLUSTER = "BlackHoleCluster"
PASSTHROUGH_CLUSTER = "PassthroughCluster"
INBOUND_PASSTHROUGH_CLUSTER = "InboundPassthroughCluster"

VIRTUAL_OUTBOUND = "virtualOutbound"
VIRTUAL_INBOUND = "virtualInbound"
# Filter chain names Istio gives the virtual listeners' fixed chains.
VIRTUAL_OUTBOUND_CATCH_ALL_CHAIN = "PassthroughFilterChain"
VIRTUAL_OUTBOUND_BLACKHOLE_CHAIN = "virtualOutbound-blackhole"
VIRTUAL_INBOUND_CATCH_ALL_CHAIN = "virtualInbound"
VIRTUAL_INBOUND_BLACKHOLE_CHAIN = "virtualInbound-blackhole"

ALLOW_ANY_VHOST = "allow_any"
BLOCK_ALL_VHOST = "block_all"
# meshpilot's catch-all of a bound (explicit) listener under ALLOW_ANY.
NO_ROUTE_VHOST = "no_route"
DEFAULT_ROUTE = "default"

# Istio appends this to stat prefixes so its stats tag regexes can find where a
# prefix that itself contains dots (hostnames, IPs) ends.
STAT_DELIMITER = ";"

WILDCARD_V4 = "0.0.0.0"
LOCALHOST_V4 = "127.0.0.1"


def outbound_cluster_name(port: int, subset: str, hostname: str) -> str:
    """`outbound|9080|v1|reviews.default.svc.cluster.local` (subset may be empty)."""
    return f"{OUTBOUND}|{port}|{subset}|{hostname}"


def inbound_cluster_name(port: int) -> str:
    """`inbound|8080||`: one per port the workload receives traffic on."""
    return f"{INBOUND}|{port}||"


def parse_cluster_name(name: str) -> tuple[Direction, int, str, str] | None:
    """(direction, port, subset, host) of an Istio subset key, else None."""
    parts = name.split("|")
    if len(parts) != 4:
        return None
    direction, port_text, subset, host = parts
    if direction not in (OUTBOUND, INBOUND) or not port_text.isdigit():
        return None
    port = int(port_text)
    if not 0 < port <= 65535:
        return None
    return (OUTBOUND if direction == OUTBOUND else INBOUND), port, subset, host


def outbound_sni(port: int, subset: str, hostname: str) -> str:
    """`outbound_.9080_.v1_.reviews.default.svc.cluster.local`: SNI for mesh mTLS."""
    return f"{OUTBOUND}_.{port}_.{subset}_.{hostname}"


def listener_name(bind: str, port: int) -> str:
    """`0.0.0.0_9080`, `127.0.0.2_9080`."""
    return f"{bind}_{port}"


def route_name_for_port(port: int) -> str:
    """`"9080"`: the RDS name every sidecar HTTP listener on that port shares."""
    return str(port)


def route_name_for_bind(bind: str, port: int) -> str:
    """`127.0.0.2:9080`: RDS name of a second HTTP listener on an already named port."""
    return f"{bind}:{port}"


def delimited_stat_prefix(prefix: str) -> str:
    return prefix + STAT_DELIMITER


def alt_stat_name(cluster_name: str) -> str:
    """Cluster `alt_stat_name`, as Istio: the name plus the stats delimiter."""
    return delimited_stat_prefix(cluster_name)


def outbound_http_stat_prefix(bind: str, port: int) -> str:
    """HCM stat prefix of an outbound listener: `outbound_0.0.0.0_9080` (Istio: no `;`)."""
    return f"{OUTBOUND}_{listener_name(bind, port)}"


def inbound_http_stat_prefix(bind: str, port: int) -> str:
    """HCM stat prefix of an inbound chain: `inbound_0.0.0.0_9080;`."""
    return delimited_stat_prefix(f"{INBOUND}_{listener_name(bind, port)}")


def virtual_host_name(hostname: str, port: int) -> str:
    return f"{hostname}:{port}"


def inbound_virtual_host_name(port: int) -> str:
    return f"inbound|http|{port}"
