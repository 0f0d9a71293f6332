"""The Envoy bootstrap: Istio node identity, ADS wiring, proto validity, and the CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Imported for their descriptors: ParseDict resolves the `@type` of each Any through them.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.resource_monitors.downstream_connections.v3 import (  # noqa: F401
    downstream_connections_pb2,
)
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from meshpilot.agent import bootstrap as bs
from meshpilot.model.proxy import Proxy


def parse(doc: dict[str, Any]) -> bootstrap_pb2.Bootstrap:
    return json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())


def reviews(**kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "name": "reviews-v1-7d8f",
        "namespace": "bookinfo",
        "ip": "127.0.0.21",
        "labels": {"app": "reviews", "version": "v1"},
        "service_account": "bookinfo-reviews",
    }
    args.update(kwargs)
    return bs.build_bootstrap(**args)


def test_node_identity_is_istio_shaped_and_round_trips_through_proxy_model() -> None:
    doc = reviews(locality="us-east1/us-east1-b/rack7")
    node = doc["node"]
    assert node["id"] == "sidecar~127.0.0.21~reviews-v1-7d8f.bookinfo~bookinfo.svc.cluster.local"
    assert node["cluster"] == "reviews-v1-7d8f.bookinfo"
    assert node["locality"] == {"region": "us-east1", "zone": "us-east1-b", "sub_zone": "rack7"}
    meta = node["metadata"]
    assert meta["NAMESPACE"] == "bookinfo"
    assert meta["LABELS"] == {"app": "reviews", "version": "v1"}
    assert meta["SERVICE_ACCOUNT"] == "bookinfo-reviews"
    assert meta["WORKLOAD_NAME"] == "reviews-v1-7d8f"
    assert meta["CLUSTER_ID"] == "Kubernetes"
    assert meta["MESH_ID"] == "cluster.local"
    assert meta["INSTANCE_IPS"] == "127.0.0.21"
    assert meta["ISTIO_VERSION"] == bs.ISTIO_VERSION
    assert meta["INTERCEPTION_MODE"] == "NONE"
    assert meta["PROXY_CONFIG"]["discoveryAddress"] == "127.0.0.1:15010"
    assert "NETWORK" not in meta

    proxy = Proxy.from_node(json_format.ParseDict(node, base_pb2.Node()))
    assert (proxy.type, proxy.ip, proxy.namespace) == ("sidecar", "127.0.0.21", "bookinfo")
    assert proxy.labels == {"app": "reviews", "version": "v1"}
    assert proxy.dns_domain == "bookinfo.svc.cluster.local"
    assert proxy.interception_mode == "NONE"
    assert str(proxy.locality) == "us-east1/us-east1-b/rack7"


def test_router_type_dns_domain_extra_ips_and_partial_locality() -> None:
    doc = bs.build_bootstrap(
        name="ingressgateway",
        namespace="istio-system",
        ip="127.0.0.40",
        instance_ips=["127.0.0.40", "127.0.0.41"],
        proxy_type="router",
        dns_domain="example.org",
        network="net1",
        locality="eu-west1",
    )
    node = doc["node"]
    assert node["id"] == (
        "router~127.0.0.40~ingressgateway.istio-system~istio-system.svc.example.org"
    )
    assert node["metadata"]["INSTANCE_IPS"] == "127.0.0.40,127.0.0.41"
    assert node["metadata"]["NETWORK"] == "net1"
    assert node["metadata"]["LABELS"] == {}
    assert node["locality"] == {"region": "eu-west1"}
    assert "locality" not in reviews()["node"]


@pytest.mark.parametrize(("delta", "api_type"), [(False, "GRPC"), (True, "DELTA_GRPC")])
def test_ads_config_sotw_and_delta(delta: bool, api_type: str) -> None:
    dyn = reviews(delta=delta)["dynamic_resources"]
    ads = dyn["ads_config"]
    assert ads["api_type"] == api_type
    assert ads["transport_api_version"] == "V3"
    (grpc_service,) = ads["grpc_services"]
    assert grpc_service["envoy_grpc"]["cluster_name"] == "xds-grpc"
    assert ads["set_node_on_first_message_only"] is True
    for key in ("cds_config", "lds_config"):
        assert dyn[key]["ads"] == {}
        assert dyn[key]["resource_api_version"] == "V3"
    msg = parse(reviews(delta=delta))
    assert msg.dynamic_resources.ads_config.api_type == getattr(
        config_source_pb2.ApiConfigSource, api_type
    )
    assert msg.dynamic_resources.cds_config.HasField("ads")
    assert msg.dynamic_resources.lds_config.initial_fetch_timeout.seconds == 0


@pytest.mark.parametrize("delta", [False, True])
def test_ads_reconnect_backoff_is_half_a_second_up_to_five(delta: bool) -> None:
    # Envoy's own default grows to 30 s: after a control-plane restart proxies came
    # back up to 15 s late.
    msg = parse(reviews(delta=delta))
    (grpc_service,) = msg.dynamic_resources.ads_config.grpc_services
    # Where Envoy's xDS mux reads it (the GrpcService's own retry_policy is not used).
    assert not grpc_service.HasField("retry_policy")
    backoff = grpc_service.envoy_grpc.retry_policy.retry_back_off
    assert backoff.base_interval.ToMilliseconds() == 500
    assert backoff.max_interval.ToMilliseconds() == 5000


@pytest.mark.parametrize("delta", [False, True])
def test_real_envoy_validates_the_bootstrap(delta: bool) -> None:
    envoy = Path(sys.executable).parent / "envoy"
    if not envoy.is_file():
        pytest.fail(f"no Envoy binary at {envoy}; these tests never skip", pytrace=False)
    with tempfile.TemporaryDirectory(prefix="mp-validate-") as tmp:
        path = Path(tmp) / "bootstrap.json"
        path.write_text(json.dumps(reviews(delta=delta, admin_port=0, stats_port=15090)))
        argv = [str(envoy), "--mode", "validate", "-c", str(path), "--disable-hot-restart"]
        done = subprocess.run(
            [*argv, "--log-level", "warn"], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 0, done.stdout + done.stderr


def test_xds_cluster_static_for_ip_with_http2_and_raised_limits() -> None:
    msg = parse(reviews(xds_address="127.0.0.5:15010", admin_port=15123))
    (cluster,) = msg.static_resources.clusters
    assert cluster.name == "xds-grpc"
    assert cluster.type == cluster.STATIC
    assert cluster.connect_timeout.seconds == 1
    sock = cluster.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sock.address, sock.port_value) == ("127.0.0.5", 15010)
    assert all(t.max_requests.value >= 100000 for t in cluster.circuit_breakers.thresholds)
    assert cluster.upstream_connection_options.tcp_keepalive.keepalive_time.value > 0
    options = cluster.typed_extension_protocol_options[bs._HTTP_PROTOCOL_OPTIONS]
    assert options.type_url.endswith("HttpProtocolOptions")
    http = http_protocol_options_pb2.HttpProtocolOptions()
    options.Unpack(http)
    assert http.explicit_http_config.HasField("http2_protocol_options")
    admin = msg.admin.address.socket_address
    assert (admin.address, admin.port_value) == ("127.0.0.1", 15123)
    assert not msg.static_resources.listeners


def test_xds_cluster_strict_dns_v4_for_hostname_and_brackets_for_ipv6() -> None:
    msg = parse(reviews(xds_address="meshpilot.istio-system.svc:15012"))
    cluster = msg.static_resources.clusters[0]
    assert cluster.type == cluster.STRICT_DNS
    assert cluster.dns_lookup_family == cluster.V4_ONLY
    v6 = reviews(xds_address="[::1]:15010")["static_resources"]["clusters"][0]
    endpoint = v6["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "::1", "port_value": 15010}


def test_runtime_overload_and_optional_stats_listener_parse() -> None:
    doc = reviews(stats_port=15090)
    msg = parse(doc)
    (monitor,) = msg.overload_manager.resource_monitors
    assert monitor.name == "envoy.resource_monitors.global_downstream_max_connections"
    assert [layer.name for layer in msg.layered_runtime.layers] == ["global config", "admin"]
    (listener,) = msg.static_resources.listeners
    assert listener.address.socket_address.address == "127.0.0.21"
    assert listener.address.socket_address.port_value == 15090
    assert {c.name for c in msg.static_resources.clusters} == {"xds-grpc", "prometheus_stats"}


def test_output_is_plain_json() -> None:
    doc = reviews(stats_port=15090, delta=True, locality="a/b/c")
    assert json.loads(json.dumps(doc)) == doc


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "name must not be empty"),
        ({"name": "a.b"}, "name 'a.b'"),
        ({"namespace": "Bad_NS"}, "namespace 'Bad_NS'"),
        ({"ip": "10.0.0"}, "ip '10.0.0' is not an IP address"),
        ({"proxy_type": "gateway"}, "type 'gateway'"),
        ({"xds_address": "127.0.0.1"}, "expected HOST:PORT"),
        ({"xds_address": "127.0.0.1:0"}, "outside 1..65535"),
        ({"xds_address": "127.0.0.1:http"}, "not a number"),
        ({"xds_address": "::1:15010"}, "[ADDR]:PORT"),
        ({"admin_port": 70000}, "admin port"),
        ({"locality": "a/b/c/d"}, "locality"),
        ({"locality": "/zone"}, "region must not be empty"),
        ({"labels": {"": "x"}}, "label key"),
        ({"service_account": "a~b"}, "service account"),
        ({"interception_mode": "MAGIC"}, "interception mode"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(bs.BootstrapError) as err:
        reviews(**kwargs)
    assert message in str(err.value)


# --- CLI ------------------------------------------------------------------------------


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="meshpilot")
    sub = parser.add_subparsers(dest="command", required=True)
    bs.register(sub)
    return parser.parse_args(argv)


def test_cli_writes_file(tmp_path: Path) -> None:
    out = tmp_path / "envoy.json"
    args = cli(
        [
            "bootstrap",
            "--name=productpage-v1",
            "--namespace=default",
            "--ip=127.0.0.30",
            "--label=app=productpage",
            "--label",
            "version=v1",
            "--label=empty=",
            "--service-account=bookinfo-productpage",
            "--type=router",
            "--xds-address=127.0.0.2:15010",
            "--admin-port=15100",
            "--delta",
            "--locality=r1/z1/s1",
            "-o",
            str(out),
        ]
    )
    assert args.func is bs.run
    assert bs.run(args) == 0
    doc = json.loads(out.read_text())
    parse(doc)
    assert doc["node"]["id"].startswith("router~127.0.0.30~productpage-v1.default~")
    assert doc["node"]["metadata"]["LABELS"] == {"app": "productpage", "version": "v1", "empty": ""}
    assert doc["node"]["metadata"]["SERVICE_ACCOUNT"] == "bookinfo-productpage"
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "DELTA_GRPC"
    assert doc["admin"]["address"]["socket_address"]["port_value"] == 15100
    assert doc["node"]["locality"]["sub_zone"] == "s1"
    assert [p.name for p in tmp_path.iterdir()] == ["envoy.json"]  # no temp file left


def test_cli_prints_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert bs.run(cli(["bootstrap", "--name", "a", "--namespace", "b"])) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["node"]["id"] == "sidecar~127.0.0.1~a.b~b.svc.cluster.local"
    assert doc["dynamic_resources"]["ads_config"]["api_type"] == "GRPC"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label", "novalue"], "label 'novalue': expected KEY=VALUE"),
        (["--ip", "300.1.1.1"], "ip '300.1.1.1' is not an IP address"),
        (["--admin-port", "abc"], "--admin-port: port 'abc' is not a number"),
        (["--admin-port", "99999"], "outside 0..65535"),
        (["--xds-address", "127.0.0.1:99999"], "xds address"),
    ],
)
def test_cli_rejects_bad_arguments_with_exit_2(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "never.json"
    args = cli(["bootstrap", "--name", "a", "--namespace", "b", "-o", str(out), *extra])
    assert bs.run(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("meshpilot bootstrap: error: ")
    assert message in captured.err
    assert not out.exists()


def test_cli_rejects_unknown_type_through_argparse(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(["bootstrap", "--name", "a", "--namespace", "b", "--type", "gateway"])
    assert exited.value.code == 2
    assert "invalid choice: 'gateway'" in capsys.readouterr().err
