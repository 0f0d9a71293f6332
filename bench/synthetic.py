"""Synthetic DiscoveryResponses shaped like a sidecar's config, for `--floor-only`.

Used to exercise the simulated proxies and the raw floor without a control plane
(and to measure the floor alone). Real runs replay responses captured from the
control plane instead.
"""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from bench import mesh, wire

ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(), resource_api_version=2
)


def _any(msg: Message, type_url: str) -> any_pb2.Any:
    return any_pb2.Any(type_url=type_url, value=msg.SerializeToString(deterministic=True))


def cluster_name(i: int) -> str:
    return f"outbound|{mesh.PORT}||{mesh.hostname(i)}"


def clusters(n: int) -> list[Message]:
    out: list[Message] = []
    for i in range(n):
        name = cluster_name(i)
        c = cluster_pb2.Cluster(
            name=name,
            type=cluster_pb2.Cluster.EDS,
            alt_stat_name=name + ";",
            connect_timeout=duration_pb2.Duration(seconds=10),
            eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
                eds_config=ADS, service_name=name
            ),
        )
        out.append(c)
    return out


def load_assignments(n: int, moved: int = 0) -> list[Message]:
    out: list[Message] = []
    for i in range(n):
        addr = mesh.workload_entry(i, moved=moved)["spec"]["address"]
        ep = endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address=addr, port_value=mesh.PORT)
                )
            )
        )
        ep.load_balancing_weight.value = 1
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(i))
        cla.endpoints.add().lb_endpoints.append(ep)
        out.append(cla)
    return out


def listeners() -> list[Message]:
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=f"outbound_0.0.0.0_{mesh.PORT}",
        rds=hcm_pb2.Rds(config_source=ADS, route_config_name=str(mesh.PORT)),
    )
    lis = listener_pb2.Listener(
        name=f"0.0.0.0_{mesh.PORT}",
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address="0.0.0.0", port_value=mesh.PORT)
        ),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_any(hcm, wire.HCM_TYPE),
                    )
                ]
            )
        ],
    )
    return [lis]


def route_configs(n: int) -> list[Message]:
    rc = route_pb2.RouteConfiguration(name=str(mesh.PORT))
    for i in range(n):
        host = mesh.hostname(i)
        vh = rc.virtual_hosts.add(
            name=f"{host}:{mesh.PORT}",
            domains=[host, f"{host}:{mesh.PORT}", f"svc-{i}", f"svc-{i}.{mesh.NAMESPACE}"],
        )
        vh.routes.append(
            route_components_pb2.Route(
                match=route_components_pb2.RouteMatch(prefix="/"),
                route=route_components_pb2.RouteAction(cluster=cluster_name(i)),
            )
        )
    return [rc]


def _response(type_url: str, msgs: list[Message], nonce: int, delta: bool) -> bytes:
    if delta:
        d = discovery_pb2.DeltaDiscoveryResponse(
            system_version_info="synthetic-1", type_url=type_url, nonce=str(nonce)
        )
        for m in msgs:
            name = m.cluster_name if type_url == wire.ENDPOINT else m.name  # type: ignore[attr-defined]
            d.resources.add(name=name, version="1", resource=_any(m, type_url))
        return d.SerializeToString()
    r = discovery_pb2.DiscoveryResponse(
        version_info="synthetic-1", type_url=type_url, nonce=str(nonce)
    )
    r.resources.extend(_any(m, type_url) for m in msgs)
    return r.SerializeToString()


def scripts(services: int, delta: bool) -> dict[str, list[bytes]]:
    """`initial` (CDS, EDS, LDS, RDS), `full` (CDS, RDS) and `eds` (one CLA)."""
    cds = _response(wire.CLUSTER, clusters(services), 1, delta)
    rds = _response(wire.ROUTE, route_configs(services), 4, delta)
    return {
        "initial": [
            cds,
            _response(wire.ENDPOINT, load_assignments(services), 2, delta),
            _response(wire.LISTENER, listeners(), 3, delta),
            rds,
        ],
        "full": [cds, rds],
        "eds": [_response(wire.ENDPOINT, load_assignments(1, moved=1), 5, delta)],
    }
