"""Envoy v3 bootstrap for a proxy that gets all of its config over ADS from meshpilot.

The output mirrors what istio-agent writes (node id and metadata, the `xds-grpc`
cluster, `initial_fetch_timeout: 0s`) so that Istio tooling and habits keep working.
With `sds_socket` (what `meshpilot agent` uses) it also has Istio's `sds-grpc` cluster
to the agent's unix socket, and `xds-grpc` speaks mutual TLS to the control plane with
the workload certificate (SDS `default`) and trust bundle (SDS `ROOTCA`) from there.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meshpilot import envflags
from meshpilot.addresses import is_ip

ISTIO_VERSION = "meshpilot-0.1"
XDS_CLUSTER = "xds-grpc"
SDS_CLUSTER = "sds-grpc"
WORKLOAD_SECRET = "default"
ROOT_SECRET = "ROOTCA"
# istiod's serving certificate carries this DNS SAN; Envoy checks it and sends it as SNI.
CONTROL_PLANE_SAN = "istiod.istio-system.svc"
DEFAULT_SECURE_XDS_ADDRESS = "127.0.0.1:15012"
PROMETHEUS_CLUSTER = "prometheus_stats"
DEFAULT_XDS_ADDRESS = "127.0.0.1:15010"
DEFAULT_ADMIN_PORT = 15000
DEFAULT_STATUS_PORT = 15020
PROXY_TYPES = ("sidecar", "router")
INTERCEPTION_MODES = ("NONE", "REDIRECT", "TPROXY")

_HTTP_PROTOCOL_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
_UPSTREAM_TLS = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
# sun_path is 108 bytes including the trailing NUL.
_MAX_PIPE_PATH = 107
_TYPE_PREFIX = "type.googleapis.com/"
_DOWNSTREAM_CONNECTIONS = (
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)
# Kubernetes DNS-1123 label: what pod names and namespaces look like. Dots and '~'
# must never appear because both are separators in the Istio node id.
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$")
# Same cap as Istio: high enough never to trip, but it silences Envoy's startup
# warning about an unlimited number of downstream connections. Envoy 1.40 deprecates
# the runtime key `overload.global_downstream_max_connections` (and warns about it),
# so the limit goes into the overload manager's resource monitor instead.
_MAX_DOWNSTREAM_CONNECTIONS = 2147483647
_CIRCUIT_BREAKER_LIMIT = 100000
# Envoy's reconnect backoff for the ADS stream. Envoy reads it from the first gRPC
# service's `envoy_grpc.retry_policy.retry_back_off` (GrpcService.retry_policy, one
# level up, is ignored for xDS); without it the delay grows from 0.5 s to 30 s, fully
# jittered, and after a control-plane restart 100 Envoys took 29 s to be back
# (bench/resync.py). Capped at 5 s they are back within 5 s of /ready; 0.5 s at first
# keeps a flapping control plane from being hammered.
XDS_RETRY_BASE_INTERVAL = "0.5s"
XDS_RETRY_MAX_INTERVAL = "5s"


class BootstrapError(ValueError):
    """An argument cannot produce a valid bootstrap; the message names the argument."""


def node_id(proxy_type: str, ip: str, name: str, namespace: str, dns_domain: str) -> str:
    """Istio node id: `TYPE~IP~NAME.NAMESPACE~NAMESPACE.svc.DNS_DOMAIN`."""
    return f"{proxy_type}~{ip}~{name}.{namespace}~{namespace}.svc.{dns_domain}"


def parse_host_port(
    text: str, *, what: str = "address", allow_zero: bool = False
) -> tuple[str, int]:
    """Split `HOST:PORT` or `[V6]:PORT`; raise BootstrapError naming `what`."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise BootstrapError(f"{what} {text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise BootstrapError(f"{what} {text!r}: {host!r} is not an IPv6 address") from e
    elif ":" in host:
        raise BootstrapError(f"{what} {text!r}: write IPv6 addresses as [ADDR]:PORT")
    elif not is_ip(host) and not _HOSTNAME.match(host):
        raise BootstrapError(f"{what} {text!r}: {host!r} is not an IP address or hostname")
    return host, parse_port(port_text, what=f"{what} {text!r}", allow_zero=allow_zero)


def parse_port(value: str | int, *, what: str = "port", allow_zero: bool = False) -> int:
    """A TCP port number; 0 only when the caller accepts an ephemeral port."""
    try:
        port = int(value)
    except (TypeError, ValueError) as e:
        raise BootstrapError(f"{what}: port {value!r} is not a number") from e
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise BootstrapError(f"{what}: port {port} is outside {low}..65535")
    return port


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    """`KEY=VALUE` strings to a dict; the value may be empty, the key may not."""
    labels: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise BootstrapError(f"label {item!r}: expected KEY=VALUE")
        key = key.strip()
        if not key or any(c.isspace() for c in key):
            raise BootstrapError(f"label {item!r}: the key must be non-empty, without spaces")
        labels[key] = value
    return labels


def parse_locality(text: str) -> dict[str, str]:
    """`region/zone/subzone` (trailing parts optional) to an Envoy Locality dict."""
    if not text:
        return {}
    parts = text.split("/")
    if len(parts) > 3:
        raise BootstrapError(f"locality {text!r}: expected REGION[/ZONE[/SUBZONE]]")
    parts += [""] * (3 - len(parts))
    if not parts[0]:
        raise BootstrapError(f"locality {text!r}: the region must not be empty")
    keys = ("region", "zone", "sub_zone")
    return {k: v for k, v in zip(keys, parts, strict=True) if v}


def build_bootstrap(
    *,
    name: str,
    namespace: str,
    ip: str = "127.0.0.1",
    labels: Mapping[str, str] | None = None,
    service_account: str = "default",
    proxy_type: str = "sidecar",
    xds_address: str = DEFAULT_XDS_ADDRESS,
    admin_port: int = DEFAULT_ADMIN_PORT,
    admin_address: str = "127.0.0.1",
    delta: bool = False,
    locality: str = "",
    dns_domain: str = "cluster.local",
    mesh_id: str = "cluster.local",
    cluster_id: str = "Kubernetes",
    network: str = "",
    instance_ips: Sequence[str] = (),
    interception_mode: str = "NONE",
    initial_fetch_timeout: str = "0s",
    stats_port: int | None = None,
    sds_socket: str | None = None,
    xds_tls: bool = True,
    control_plane_san: str = CONTROL_PLANE_SAN,
) -> dict[str, Any]:
    """Return an Envoy v3 Bootstrap as a JSON-ready dict; raise BootstrapError on bad input.

    `admin_port=0` lets Envoy pick a port (read it back with `--admin-address-path`).
    `stats_port` adds Istio's Prometheus listener (`/stats/prometheus`) on `ip`.
    `sds_socket` (the agent's unix socket) adds the `sds-grpc` cluster and, unless
    `xds_tls` is false, mutual TLS on `xds-grpc` verifying `control_plane_san`.
    """
    _check_label("name", name, maxlen=253)
    _check_label("namespace", namespace, maxlen=63)
    if proxy_type not in PROXY_TYPES:
        raise BootstrapError(f"type {proxy_type!r}: expected one of {', '.join(PROXY_TYPES)}")
    if interception_mode not in INTERCEPTION_MODES:
        raise BootstrapError(
            f"interception mode {interception_mode!r}: expected one of "
            f"{', '.join(INTERCEPTION_MODES)}"
        )
    if not _HOSTNAME.match(dns_domain):
        raise BootstrapError(f"dns domain {dns_domain!r} is not a domain name")
    for what, value in (("service account", service_account), ("mesh id", mesh_id)):
        if not value or "~" in value or any(c.isspace() for c in value):
            raise BootstrapError(f"{what} {value!r}: must be non-empty, without spaces or '~'")
    ips = [_check_ip("ip", ip)]
    ips += [_check_ip("instance ip", extra) for extra in instance_ips if extra != ip]
    _check_ip("admin address", admin_address)
    admin_port = parse_port(admin_port, what="admin port", allow_zero=True)
    xds_host, xds_port = parse_host_port(xds_address, what="xds address")
    node_locality = parse_locality(locality)
    if sds_socket is not None:
        _check_pipe("sds socket", sds_socket)
        if xds_tls and (not control_plane_san or any(c.isspace() for c in control_plane_san)):
            raise BootstrapError(f"control plane SAN {control_plane_san!r} must be a DNS name")
    mutual_tls = sds_socket is not None and xds_tls
    labels = dict(labels or {})
    for key in labels:
        if not key or "=" in key or any(c.isspace() for c in key):
            raise BootstrapError(f"label key {key!r}: must be non-empty, without '=' or spaces")

    metadata: dict[str, Any] = {
        "NAME": name,
        "NAMESPACE": namespace,
        "LABELS": labels,
        "SERVICE_ACCOUNT": service_account,
        "WORKLOAD_NAME": name,
        "CLUSTER_ID": cluster_id,
        "MESH_ID": mesh_id,
        "INSTANCE_IPS": ",".join(ips),
        "ISTIO_VERSION": ISTIO_VERSION,
        "INTERCEPTION_MODE": interception_mode,
        "PROXY_CONFIG": {
            "discoveryAddress": xds_address,
            "proxyAdminPort": admin_port,
            "statusPort": DEFAULT_STATUS_PORT,
            "serviceCluster": f"{name}.{namespace}",
            "drainDuration": "45s",
            "terminationDrainDuration": "5s",
        },
    }
    if mutual_tls:
        metadata["PROXY_CONFIG"]["controlPlaneAuthPolicy"] = "MUTUAL_TLS"
    if sds_socket is not None:
        # Tells the control plane this Envoy has `sds-grpc`, so it may reference SDS
        # secrets (an Envoy without that cluster rejects every config that does).
        metadata["SDS"] = "true"
    if network:
        metadata["NETWORK"] = network
    node: dict[str, Any] = {
        "id": node_id(proxy_type, ip, name, namespace, dns_domain),
        "cluster": f"{name}.{namespace}",
        "metadata": metadata,
    }
    if node_locality:
        node["locality"] = node_locality

    config_source = {
        "ads": {},
        "resource_api_version": "V3",
        # Like Istio: never give up waiting for the first CDS/LDS, or Envoy would go
        # LIVE with no listeners and answer 404s instead of waiting for meshpilot.
        "initial_fetch_timeout": initial_fetch_timeout,
    }
    clusters = [_xds_cluster(xds_host, xds_port)]
    if sds_socket is not None:
        clusters.append(_sds_cluster(sds_socket))
    if mutual_tls:
        clusters[0]["transport_socket"] = _control_plane_tls(control_plane_san)
    listeners = []
    if stats_port is not None:
        stats_port = parse_port(stats_port, what="stats port")
        clusters.append(_static_cluster(PROMETHEUS_CLUSTER, admin_address, admin_port))
        listeners.append(_prometheus_listener(ip, stats_port))
    bootstrap: dict[str, Any] = {
        "node": node,
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            "retry_policy": {
                                "retry_back_off": {
                                    "base_interval": XDS_RETRY_BASE_INTERVAL,
                                    "max_interval": XDS_RETRY_MAX_INTERVAL,
                                }
                            },
                        }
                    }
                ],
                "set_node_on_first_message_only": True,
            },
            "cds_config": dict(config_source),
            "lds_config": dict(config_source),
        },
        "static_resources": {"clusters": clusters, "listeners": listeners},
        "admin": {
            "address": _socket_address(admin_address, admin_port),
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": _TYPE_PREFIX
                        + "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": "/dev/null",
                    },
                }
            ],
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _TYPE_PREFIX + _DOWNSTREAM_CONNECTIONS,
                        "max_active_downstream_connections": _MAX_DOWNSTREAM_CONNECTIONS,
                    },
                }
            ]
        },
        "layered_runtime": {
            "layers": [
                {
                    "name": "global config",
                    "static_layer": {
                        # Istio raises this so that long regex routes are not rejected.
                        "re2.max_program_size.error_level": 32768,
                    },
                },
                {"name": "admin", "admin_layer": {}},
            ]
        },
    }
    if not listeners:
        del bootstrap["static_resources"]["listeners"]
    return bootstrap


def _xds_cluster(host: str, port: int) -> dict[str, Any]:
    cluster = _static_cluster(XDS_CLUSTER, host, port)
    if not is_ip(host):
        cluster["type"] = "STRICT_DNS"
        cluster["respect_dns_ttl"] = True
        # Only loopback may receive traffic here; `localhost` must not turn into ::1.
        cluster["dns_lookup_family"] = "V4_ONLY"
    limit = _CIRCUIT_BREAKER_LIMIT
    thresholds = {"max_connections": limit, "max_pending_requests": limit, "max_requests": limit}
    cluster["circuit_breakers"] = {
        "thresholds": [
            {"priority": "DEFAULT", **thresholds},
            {"priority": "HIGH", **thresholds},
        ]
    }
    # Detect a dead control plane behind a silent NAT or a paused VM within minutes.
    cluster["upstream_connection_options"] = {"tcp_keepalive": {"keepalive_time": 300}}
    cluster["typed_extension_protocol_options"] = {
        _HTTP_PROTOCOL_OPTIONS: {
            "@type": _TYPE_PREFIX + _HTTP_PROTOCOL_OPTIONS,
            "explicit_http_config": {
                "http2_protocol_options": {
                    "connection_keepalive": {"interval": "30s", "timeout": "10s"}
                }
            },
        }
    }
    return cluster


def sds_config_source() -> dict[str, Any]:
    """The ConfigSource of secrets served by the agent over `sds-grpc` (as Istio's)."""
    return {
        "api_config_source": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
            "set_node_on_first_message_only": True,
        },
        # Wait for the agent however long it takes: a listener or cluster without its
        # certificate must not go live.
        "initial_fetch_timeout": "0s",
        "resource_api_version": "V3",
    }


def sds_secret_config(name: str) -> dict[str, Any]:
    """An SdsSecretConfig for secret `name` (`default`, `ROOTCA`, ...) from the agent."""
    return {"name": name, "sds_config": sds_config_source()}


def _sds_cluster(path: str) -> dict[str, Any]:
    return {
        "name": SDS_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": SDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": path}}}}]}],
        },
        "typed_extension_protocol_options": {
            _HTTP_PROTOCOL_OPTIONS: {
                "@type": _TYPE_PREFIX + _HTTP_PROTOCOL_OPTIONS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }


def _control_plane_tls(san: str) -> dict[str, Any]:
    # As Istio's bootstrap did before its agent proxied xDS: present the workload
    # certificate, trust only the mesh root, and accept only istiod's DNS SAN.
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _TYPE_PREFIX + _UPSTREAM_TLS,
            "sni": san,
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "tls_certificate_sds_secret_configs": [sds_secret_config(WORKLOAD_SECRET)],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": san}}
                        ]
                    },
                    "validation_context_sds_secret_config": sds_secret_config(ROOT_SECRET),
                },
            },
        },
    }


def _check_pipe(what: str, path: str) -> None:
    if not path or "\0" in path:
        raise BootstrapError(f"{what} {path!r}: expected a unix socket path")
    if len(path.encode()) > _MAX_PIPE_PATH:
        raise BootstrapError(
            f"{what} {path!r}: {len(path.encode())} bytes, longer than a unix socket "
            f"path may be ({_MAX_PIPE_PATH})"
        )


def _static_cluster(name: str, host: str, port: int) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}
            ],
        },
    }


def _prometheus_listener(ip: str, port: int) -> dict[str, Any]:
    hcm = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
    return {
        "name": f"{ip}_{port}",
        "address": _socket_address(ip, port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": _TYPE_PREFIX + hcm,
                            "stat_prefix": "stats",
                            "codec_type": "AUTO",
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "backend",
                                        "domains": ["*"],
                                        "routes": [
                                            {
                                                "match": {"prefix": "/stats/prometheus"},
                                                "route": {"cluster": PROMETHEUS_CLUSTER},
                                            }
                                        ],
                                    }
                                ]
                            },
                            "http_filters": [
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": _TYPE_PREFIX
                                        + "envoy.extensions.filters.http.router.v3.Router"
                                    },
                                }
                            ],
                        },
                    }
                ]
            }
        ],
    }


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _check_ip(what: str, text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError as e:
        raise BootstrapError(f"{what} {text!r} is not an IP address") from e


def _check_label(what: str, value: str, *, maxlen: int) -> None:
    if not value:
        raise BootstrapError(f"{what} must not be empty")
    if len(value) > maxlen or not _DNS_LABEL.match(value):
        raise BootstrapError(
            f"{what} {value!r}: expected lowercase letters, digits and '-' "
            f"(at most {maxlen}, no '.' or '~')"
        )


# --- CLI -----------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `bootstrap` subcommand; its handler is `args.func` (= `run`)."""
    p = subparsers.add_parser(
        "bootstrap",
        help="print an Envoy bootstrap that gets its config over ADS from meshpilot",
        description="Write an Envoy v3 bootstrap (JSON) for a sidecar or gateway proxy.",
    )
    p.add_argument("--name", required=True, help="workload (pod) name")
    p.add_argument("--namespace", required=True, help="Kubernetes namespace")
    p.add_argument("--ip", default="127.0.0.1", help="the proxy's IP")
    p.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="workload label; repeat for more",
    )
    p.add_argument(
        "--service-account", default="default", metavar="SA", help="the workload's ServiceAccount"
    )
    p.add_argument(
        "--type",
        dest="proxy_type",
        choices=PROXY_TYPES,
        default="sidecar",
        help="proxy type in the node id (router: a gateway)",
    )
    p.add_argument(
        "--xds-address",
        default=DEFAULT_XDS_ADDRESS,
        metavar="HOST:PORT",
        help="meshpilot's xDS address",
    )
    p.add_argument(
        "--admin-port",
        default=str(DEFAULT_ADMIN_PORT),
        metavar="PORT",
        help="Envoy's admin port (loopback)",
    )
    p.add_argument("--delta", action="store_true", help="use delta xDS (DELTA_GRPC)")
    p.add_argument("--locality", default="", metavar="R/Z/S", help="region/zone/subzone")
    p.add_argument(
        "-o", "--output", default="-", metavar="FILE", help="where to write (default: stdout)"
    )
    p.set_defaults(func=run)
    envflags.bind_environment(p)


def run(args: argparse.Namespace) -> int:
    """Print the bootstrap JSON or write it to `args.output`; 2 on bad arguments."""
    try:
        bootstrap = build_bootstrap(
            name=args.name,
            namespace=args.namespace,
            ip=args.ip,
            labels=parse_labels(args.label or []),
            service_account=args.service_account,
            proxy_type=args.proxy_type,
            xds_address=args.xds_address,
            admin_port=parse_port(args.admin_port, what="--admin-port", allow_zero=True),
            delta=bool(args.delta),
            locality=args.locality or "",
        )
    except BootstrapError as e:
        print(f"meshpilot bootstrap: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(bootstrap, indent=2, sort_keys=False) + "\n"
    output = getattr(args, "output", "-") or "-"
    if output == "-":
        sys.stdout.write(text)
        return 0
    try:
        _write_atomically(Path(output), text)
    except OSError as e:
        print(f"meshpilot bootstrap: error: cannot write {output}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


def _write_atomically(path: Path, text: str) -> None:
    # An Envoy (or a watcher) reading the file must never see half of it.
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
