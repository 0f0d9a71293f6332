"""A Generator whose output the tests control, with the contract of the real one."""

from __future__ import annotations

from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_request import PushRequest
from meshpilot.xds import typeurls
from meshpilot.xds.resources import Generated, PushContextLike, Resource


@dataclass(frozen=True)
class FakeContext:
    version: str


def make_message(type_url: str, name: str, tag: str) -> Message:
    """A small real Envoy message whose content changes with `tag`."""
    if type_url == typeurls.CLUSTER:
        return cluster_pb2.Cluster(name=name, alt_stat_name=f"{name};{tag}")
    if type_url == typeurls.ENDPOINT:
        cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
        lb = cla.endpoints.add().lb_endpoints.add()
        lb.endpoint.hostname = tag
        return cla
    if type_url == typeurls.LISTENER:
        return listener_pb2.Listener(name=name, stat_prefix=tag)
    if type_url == typeurls.ROUTE:
        return route_pb2.RouteConfiguration(name=name, virtual_hosts=[{"name": tag}])
    raise ValueError(type_url)


def decode(body: any_pb2.Any) -> tuple[str, str]:
    """(name, tag) of a resource built by make_message."""
    if body.type_url == typeurls.CLUSTER:
        c = cluster_pb2.Cluster.FromString(body.value)
        return c.name, c.alt_stat_name.split(";", 1)[1]
    if body.type_url == typeurls.ENDPOINT:
        cla = endpoint_pb2.ClusterLoadAssignment.FromString(body.value)
        return cla.cluster_name, cla.endpoints[0].lb_endpoints[0].endpoint.hostname
    if body.type_url == typeurls.LISTENER:
        lis = listener_pb2.Listener.FromString(body.value)
        return lis.name, lis.stat_prefix
    if body.type_url == typeurls.ROUTE:
        rc = route_pb2.RouteConfiguration.FromString(body.value)
        return rc.name, rc.virtual_hosts[0].name
    raise ValueError(body.type_url)


@dataclass
class Call:
    type_url: str
    proxy_id: str
    version: str
    names: frozenset[str] | None
    request: PushRequest | None


@dataclass
class FakeGenerator:
    """Holds name -> Resource per type; wildcard types answer everything."""

    resources: dict[str, dict[str, Resource]] = field(
        default_factory=lambda: {t: {} for t in typeurls.PUSH_ORDER}
    )
    calls: list[Call] = field(default_factory=list)
    fail_for: set[str] = field(default_factory=set)
    # Types for which a push finds nothing to send (generate returns None).
    unchanged_on_push: set[str] = field(default_factory=set)

    def put(self, type_url: str, name: str, tag: str = "1") -> Resource:
        r = Resource.of(name, make_message(type_url, name, tag), type_url)
        self.resources[type_url][name] = r
        return r

    def delete(self, type_url: str, name: str) -> None:
        del self.resources[type_url][name]

    def generate(
        self,
        type_url: str,
        proxy: Proxy,
        push: PushContextLike,
        names: frozenset[str] | None,
        request: PushRequest | None,
    ) -> Generated | None:
        self.calls.append(Call(type_url, proxy.id, push.version, names, request))
        if type_url in self.fail_for:
            raise RuntimeError(f"generator failure for {type_url}")
        if request is not None and type_url in self.unchanged_on_push:
            return None
        have = self.resources[type_url]
        if names is None:
            return Generated(tuple(have[n] for n in sorted(have)), complete=True)
        if request is not None and not request.full:
            # Endpoint-only push: the changed ClusterLoadAssignments this proxy watches.
            changed = sorted(n for n in request.eds_hosts if n in names and n in have)
            if not changed:
                return None
            return Generated(tuple(have[n] for n in changed), complete=False)
        return Generated(tuple(have[n] for n in sorted(names) if n in have), complete=True)
