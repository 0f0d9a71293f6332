"""Istio's own sample manifests, read unchanged from tests/data/istio-samples, plus the
WorkloadEntries that stand in for their Deployments' pods."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2, route_pb2

from meshpilot.api.mesh import MeshConfig
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.translators.routes import build_route_configs
from tests.samples import ISTIO_SAMPLES

from ._helpers import dedent, push_of, sidecar

SAMPLES = ISTIO_SAMPLES
NETWORKING = SAMPLES / "bookinfo" / "networking"

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
DETAILS = "details.default.svc.cluster.local"
PRODUCTPAGE = "productpage.default.svc.cluster.local"
TCP_ECHO = "tcp-echo.default.svc.cluster.local"


def sample(relpath: str) -> str:
    """A sample manifest's text; a missing corpus fails loudly instead of skipping."""
    path = SAMPLES / relpath
    if not path.is_file():
        raise RuntimeError(f"Istio sample missing: expected {path} (tests/data/istio-samples)")
    return path.read_text()


def networking(name: str) -> str:
    return sample(f"bookinfo/networking/{name}")


def _workloads(app: str, versions: tuple[str, ...], first_ip: int) -> str:
    docs = []
    for i, version in enumerate(versions):
        docs.append(
            dedent(
                f"""
                apiVersion: networking.istio.io/v1
                kind: WorkloadEntry
                metadata: {{name: {app}-{version}, namespace: default}}
                spec:
                  address: 10.1.0.{first_ip + i}
                  labels: {{app: {app}, version: {version}}}
                """
            )
        )
    return "\n---\n".join(docs)


def bookinfo_base() -> str:
    """bookinfo.yaml's Services (Deployments are ignored) and one endpoint per version."""
    return "\n---\n".join(
        [
            sample("bookinfo/platform/kube/bookinfo.yaml"),
            _workloads("productpage", ("v1",), 10),
            _workloads("details", ("v1", "v2"), 20),
            _workloads("ratings", ("v1", "v2"), 30),
            _workloads("reviews", ("v1", "v2", "v3"), 40),
        ]
    )


def tcp_echo_base() -> str:
    return "\n---\n".join(
        [sample("tcp-echo/tcp-echo-services.yaml"), _workloads("tcp-echo", ("v1", "v2"), 50)]
    )


def bookinfo(*docs: str, mesh: MeshConfig | None = None) -> PushContext:
    return push_of(*docs, mesh=mesh, base=bookinfo_base())


def productpage(**kw: object) -> Proxy:
    """The client proxy of these tests: productpage-v1 in default."""
    args: dict[str, object] = {
        "ip": "10.1.0.10",
        "name": "productpage-v1",
        "labels": {"app": "productpage", "version": "v1"},
    }
    args.update(kw)
    return sidecar(**args)  # type: ignore[arg-type]


def route_config(
    push: PushContext, proxy: Proxy | None = None, name: str = "9080"
) -> route_pb2.RouteConfiguration:
    (rc,) = build_route_configs(push, proxy or productpage(), [name])
    return rc


def vhost(
    rc: route_pb2.RouteConfiguration, host: str, port: int = 9080
) -> route_components_pb2.VirtualHost:
    for vh in rc.virtual_hosts:
        if vh.name == f"{host}:{port}":
            return vh
    raise AssertionError(f"no virtual host {host}:{port} in {[v.name for v in rc.virtual_hosts]}")


def routes_of(
    push: PushContext, host: str, proxy: Proxy | None = None, port: int = 9080
) -> list[route_components_pb2.Route]:
    return list(vhost(route_config(push, proxy, str(port)), host, port).routes)
