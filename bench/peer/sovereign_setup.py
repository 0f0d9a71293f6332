"""sovereign (PyPI, 0.32.12) as the peer: its own virtualenv, config, templates, client.

sovereign is a REST-JSON xDS server (FastAPI under gunicorn + uvicorn workers). A
proxy POSTs a DiscoveryRequest (JSON, carrying its node) to `/v3/discovery:<type>`;
for every request sovereign selects the template for the type, renders it with the
source instances (Jinja2 -> YAML text -> `yaml.safe_load`), hashes the result into a
version, filters by `resource_names`, and answers JSON (304 if the hash equals the
request's `version_info`). Nothing is cached between requests unless the optional
redis discovery cache is configured (it is not here: it needs a redis server, and
caches per node cluster, which would hide the per-request render cost we compare).

Here: a `file` source (JSON list of instances, re-read every `refresh_rate` seconds,
so an endpoint change is a rewrite of that file), node matching off (every proxy sees
every service, as meshpilot's proxies do), access logs off (meshpilot logs at
warning), the `orjson` and `httptools` extras installed (its fastest documented
setup). The templates render what meshpilot renders for a sidecar: one EDS cluster,
one ClusterLoadAssignment and one virtual host per service, an outbound listener for
the port, Istio's fixed BlackHole/Passthrough/InboundPassthrough clusters and its
virtualOutbound/virtualInbound listeners, and for a proxy whose IP is an endpoint's,
an inbound cluster and an inbound filter chain on virtualInbound.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from bench.peer import workload

VERSION = "0.32.12"
REQUIREMENT = f"sovereign[orjson,httptools]=={VERSION}"
INSTALL_TIMEOUT = 600.0
MAX_RESPONSE = 256 * 1024 * 1024

TYPES = ("clusters", "endpoints", "listeners", "routes")

# The node IP from Istio's node id `sidecar~IP~POD.NS~NS.svc.cluster.local`; a proxy
# whose IP is one of a service's endpoints is that workload's sidecar.
_NODE_IP = (
    "{% set parts = discovery_request.node.id.split('~') %}"
    "{% set node_ip = parts[1] if parts|length == 4 else '' %}"
)

CLUSTERS = (
    _NODE_IP
    + """
resources:
  - name: BlackHoleCluster
    type: STATIC
    connect_timeout: 10s
  - name: PassthroughCluster
    type: ORIGINAL_DST
    connect_timeout: 10s
    lb_policy: CLUSTER_PROVIDED
  - name: InboundPassthroughCluster
    type: ORIGINAL_DST
    connect_timeout: 10s
    lb_policy: CLUSTER_PROVIDED
    upstream_bind_config:
      source_address:
        address: 127.0.0.6
        port_value: 0
{% for s in instances %}
  - name: "outbound|{{ s.port }}||{{ s.host }}"
    type: EDS
    eds_cluster_config:
      service_name: "outbound|{{ s.port }}||{{ s.host }}"
      eds_config:
        ads: {}
        initial_fetch_timeout: 0s
        resource_api_version: V3
    connect_timeout: 10s
    lb_policy: LEAST_REQUEST
    circuit_breakers:
      thresholds:
        - max_connections: 4294967295
          max_pending_requests: 4294967295
          max_requests: 4294967295
          max_retries: 4294967295
          track_remaining: true
    common_lb_config: {}
    metadata:
      filter_metadata:
        istio:
          services:
            - host: "{{ s.host }}"
              name: "{{ s.name }}"
              namespace: "{{ s.namespace }}"
{% if node_ip in s.endpoints %}
  - name: "inbound|{{ s.port }}||"
    type: ORIGINAL_DST
    connect_timeout: 10s
    lb_policy: CLUSTER_PROVIDED
    upstream_bind_config:
      source_address:
        address: 127.0.0.6
        port_value: 0
{% endif %}
{% endfor %}
"""
)

ENDPOINTS = """
resources:
{% for s in instances %}
  - cluster_name: "outbound|{{ s.port }}||{{ s.host }}"
    endpoints:
      - lb_endpoints:
{% for ip in s.endpoints %}
          - endpoint:
              address:
                socket_address:
                  address: "{{ ip }}"
                  port_value: {{ s.port }}
            health_status: HEALTHY
            load_balancing_weight: 1
{% endfor %}
{% endfor %}
"""

_TCP_PASSTHROUGH = """
      - name: passthrough
        filters:
          - name: envoy.filters.network.tcp_proxy
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
              stat_prefix: {cluster}
              cluster: {cluster}
"""

LISTENERS = (
    _NODE_IP
    + """
resources:
  - name: virtualOutbound
    address:
      socket_address:
        address: 0.0.0.0
        port_value: 15001
    use_original_dst: true
    traffic_direction: OUTBOUND
    filter_chains:"""
    + _TCP_PASSTHROUGH.format(cluster="PassthroughCluster")
    + """
  - name: virtualInbound
    address:
      socket_address:
        address: 0.0.0.0
        port_value: 15006
    traffic_direction: INBOUND
    listener_filters:
      - name: envoy.filters.listener.original_dst
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst
    filter_chains:"""
    + _TCP_PASSTHROUGH.format(cluster="InboundPassthroughCluster")
    + """
{% for s in instances %}{% if node_ip in s.endpoints %}
      - name: "{{ node_ip }}_{{ s.port }}"
        filter_chain_match:
          destination_port: {{ s.port }}
        filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": HCM_TYPE_URL
              stat_prefix: "inbound_{{ node_ip }}_{{ s.port }}"
              route_config:
                name: "inbound|{{ s.port }}||"
                virtual_hosts:
                  - name: "inbound|http|{{ s.port }}"
                    domains: ["*"]
                    routes:
                      - match: {prefix: /}
                        route:
                          cluster: "inbound|{{ s.port }}||"
                          timeout: 0s
              http_filters:
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
{% endif %}{% endfor %}
  - name: "0.0.0.0_9080"
    address:
      socket_address:
        address: 0.0.0.0
        port_value: 9080
    bind_to_port: false
    traffic_direction: OUTBOUND
    filter_chains:
      - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": HCM_TYPE_URL
              stat_prefix: outbound_0.0.0.0_9080
              rds:
                route_config_name: "9080"
                config_source:
                  ads: {}
                  resource_api_version: V3
              http_filters:
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""
)

ROUTES = """
resources:
  - name: "9080"
    validate_clusters: false
    virtual_hosts:
{% for s in instances %}
      - name: "{{ s.host }}:{{ s.port }}"
        domains:
          - "{{ s.host }}"
          - "{{ s.host }}:{{ s.port }}"
          - "{{ s.name }}"
          - "{{ s.name }}:{{ s.port }}"
          - "{{ s.name }}.{{ s.namespace }}"
          - "{{ s.name }}.{{ s.namespace }}:{{ s.port }}"
          - "{{ s.vip }}"
          - "{{ s.vip }}:{{ s.port }}"
        routes:
          - name: default
            match: {prefix: /}
            route:
              cluster: "outbound|{{ s.port }}||{{ s.host }}"
              timeout: 0s
              retry_policy:
                retry_on: "RETRY_ON"
                num_retries: 2
{% endfor %}
"""

HCM_TYPE_URL = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"


def _expand(template: str) -> str:
    # Long literals are spliced in here to keep the template lines short.
    return template.replace("HCM_TYPE_URL", HCM_TYPE_URL).replace("RETRY_ON", RETRY_ON)


TEMPLATES = {
    "clusters": _expand(CLUSTERS),
    "endpoints": _expand(ENDPOINTS),
    "listeners": _expand(LISTENERS),
    "routes": _expand(ROUTES),
}


def ensure_venv(venv: Path) -> Path:
    """Create `venv` and install sovereign into it (once); returns its `sovereign`."""
    exe = venv / "bin" / "sovereign"
    python = venv / "bin" / "python"
    if exe.exists():
        meta = subprocess.run(
            [str(python), "-m", "pip", "show", "sovereign"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if f"Version: {VERSION}" in meta.stdout:
            return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", REQUIREMENT],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"pip install {REQUIREMENT} into {venv} failed (exit {done.returncode}): "
            f"{done.stderr.strip()[-2000:]}"
        )
    return exe


def config_doc(workdir: Path, refresh_rate: int) -> dict[str, Any]:
    """sovereign's (v2) configuration for the templates and source file in `workdir`."""
    return {
        "templates": {
            "default": [
                {
                    "type": t,
                    "spec": {
                        "protocol": "file",
                        "serialization": "jinja2",
                        "path": str(workdir / f"{t}.yaml.j2"),
                    },
                }
                for t in TYPES
            ]
        },
        "sources": [
            {
                "type": "file",
                "config": {
                    "spec": {
                        "protocol": "file",
                        "serialization": "json",
                        "path": str(workdir / "instances.json"),
                    }
                },
            }
        ],
        "source_config": {"refresh_rate": refresh_rate},
        "matching": {"enabled": False},
        "logging": {
            "application_logs": {"enabled": False},
            "access_logs": {"enabled": False},
        },
    }


def write_instances(workdir: Path, mesh: workload.Mesh) -> None:
    """Atomically replace the source file (sovereign may read it at any moment)."""
    tmp = workdir / "instances.json.tmp"
    tmp.write_text(json.dumps(workload.sovereign_instances(mesh)))
    os.replace(tmp, workdir / "instances.json")


def write_config(workdir: Path, mesh: workload.Mesh, refresh_rate: int) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    for t, text in TEMPLATES.items():
        (workdir / f"{t}.yaml.j2").write_text(text)
    write_instances(workdir, mesh)
    path = workdir / "sovereign.json"
    path.write_text(json.dumps(config_doc(workdir, refresh_rate), indent=1))
    return path


def server_env(config: Path, port: int, workers: int) -> dict[str, str]:
    return {
        **os.environ,
        "SOVEREIGN_CONFIG": f"file+json://{config}",
        "SOVEREIGN_HOST": "127.0.0.1",
        "SOVEREIGN_PORT": str(port),
        "SOVEREIGN_WORKERS": str(workers),
        "SOVEREIGN_ENABLE_ACCESS_LOGS": "False",
        "SOVEREIGN_ENABLE_APPLICATION_LOGS": "False",
        "SOVEREIGN_DEBUG": "False",
    }


def node(ip: str, name: str, namespace: str) -> dict[str, Any]:
    return {
        "id": workload.node_id(ip, name, namespace),
        "cluster": f"{name}.{namespace}",
        "metadata": {"NAMESPACE": namespace},
    }


class RestProxy:
    """One proxy polling sovereign over REST like Envoy's REST xDS subscriptions:
    CDS, then EDS for the EDS clusters, then LDS, then RDS for the listeners' routes."""

    def __init__(self, session: aiohttp.ClientSession, base: str, node: dict[str, Any]) -> None:
        self.session = session
        self.base = base
        self.node = node
        self.versions: dict[str, str] = {}
        self.eds_names: list[str] = []
        self.bytes = dict.fromkeys(TYPES, 0)
        self.counts = dict.fromkeys(TYPES, 0)
        self.check = False

    async def fetch(self, xds: str, names: list[str]) -> list[dict[str, Any]] | None:
        """One DiscoveryRequest; None when sovereign answers 304 (unchanged)."""
        body = {
            "node": self.node,
            "version_info": self.versions.get(xds, "0"),
            "resource_names": names,
        }
        async with self.session.post(f"{self.base}/v3/discovery:{xds}", json=body) as resp:
            if resp.status == 304:
                return None
            data = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"sovereign {xds}: HTTP {resp.status}: {data[:300]!r}")
            if len(data) > MAX_RESPONSE:
                raise RuntimeError(f"sovereign {xds}: response of {len(data)} bytes")
        doc = json.loads(data)
        self.versions[xds] = doc["version_info"]
        self.bytes[xds] = len(data)
        resources: list[dict[str, Any]] = doc["resources"]
        self.counts[xds] = len(resources)
        if self.check:
            validate(resources)
        return resources

    async def full(self) -> None:
        clusters = await self.fetch("clusters", []) or []
        self.eds_names = [
            c["eds_cluster_config"]["service_name"] for c in clusters if c.get("type") == "EDS"
        ]
        await self.fetch("endpoints", self.eds_names)
        listeners = await self.fetch("listeners", []) or []
        await self.fetch("routes", route_names(listeners))

    async def endpoints(self) -> bool:
        """Poll EDS once; True if it changed."""
        return await self.fetch("endpoints", self.eds_names) is not None


def validate(resources: list[dict[str, Any]]) -> int:
    """Parse every rendered resource into its Envoy v3 message (by its `@type`), so a
    template typo cannot make sovereign's side cheaper by producing less. Returns the
    number of resources checked; raises ValueError naming the resource otherwise."""
    # Registers the message types that typed_config Anys refer to.
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
        http_connection_manager_pb2,
    )
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
    from google.protobuf import json_format

    messages = {
        "type.googleapis.com/envoy.config.cluster.v3.Cluster": cluster_pb2.Cluster,
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment": (
            endpoint_pb2.ClusterLoadAssignment
        ),
        "type.googleapis.com/envoy.config.listener.v3.Listener": listener_pb2.Listener,
        "type.googleapis.com/envoy.config.route.v3.RouteConfiguration": (
            route_pb2.RouteConfiguration
        ),
    }
    for res in resources:
        body = dict(res)
        type_url = body.pop("@type", "")
        cls = messages.get(type_url)
        name = body.get("name") or body.get("cluster_name")
        if cls is None:
            raise ValueError(f"sovereign resource {name!r}: unexpected @type {type_url!r}")
        try:
            json_format.ParseDict(body, cls())
        except json_format.ParseError as e:
            raise ValueError(f"sovereign resource {name!r} is not a valid {type_url}: {e}") from e
    return len(resources)


def route_names(listeners: list[dict[str, Any]]) -> list[str]:
    out: set[str] = set()
    for lis in listeners:
        for chain in lis.get("filter_chains", []):
            for flt in chain.get("filters", []):
                rds = flt.get("typed_config", {}).get("rds")
                if rds and rds.get("route_config_name"):
                    out.add(rds["route_config_name"])
    return sorted(out)
