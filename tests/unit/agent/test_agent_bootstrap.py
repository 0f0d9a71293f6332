"""The agent's bootstrap: Istio's `sds-grpc` cluster and `xds-grpc` over mutual TLS with
secrets from SDS; valid as a proto and for the real Envoy (`--mode validate`)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Imported for their descriptors: ParseDict resolves each `@type` through them.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.resource_monitors.downstream_connections.v3 import (  # noqa: F401
    downstream_connections_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from meshpilot.agent import bootstrap as bs

SOCKET = "/tmp/mp-agent-x/sds.sock"


def agent_bootstrap(**kwargs: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "name": "client-1",
        "namespace": "default",
        "service_account": "client",
        "xds_address": bs.DEFAULT_SECURE_XDS_ADDRESS,
        "sds_socket": SOCKET,
    }
    args.update(kwargs)
    return bs.build_bootstrap(**args)


def clusters(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def test_sds_grpc_cluster_is_a_pipe_with_http2() -> None:
    proto = json_format.ParseDict(agent_bootstrap(), bootstrap_pb2.Bootstrap())
    sds = next(c for c in proto.static_resources.clusters if c.name == bs.SDS_CLUSTER)
    address = sds.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert address.pipe.path == SOCKET
    opts = sds.typed_extension_protocol_options[
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert opts.type_url.endswith("HttpProtocolOptions")


def test_xds_grpc_is_mutual_tls_with_sds_secrets_and_istiod_san() -> None:
    doc = agent_bootstrap()
    proto = json_format.ParseDict(doc, bootstrap_pb2.Bootstrap())
    xds = next(c for c in proto.static_resources.clusters if c.name == bs.XDS_CLUSTER)
    sock = xds.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (sock.address, sock.port_value) == ("127.0.0.1", 15012)
    assert xds.transport_socket.name == "envoy.transport_sockets.tls"
    tls = tls_pb2.UpstreamTlsContext()
    assert xds.transport_socket.typed_config.Unpack(tls)
    assert tls.sni == "istiod.istio-system.svc"
    ctx = tls.common_tls_context
    assert list(ctx.alpn_protocols) == ["h2"]
    (cert,) = ctx.tls_certificate_sds_secret_configs
    assert cert.name == "default"
    validation = ctx.combined_validation_context
    assert validation.validation_context_sds_secret_config.name == "ROOTCA"
    (san,) = validation.default_validation_context.match_typed_subject_alt_names
    assert san.san_type == san.DNS and san.matcher.exact == "istiod.istio-system.svc"
    for source in (cert.sds_config, validation.validation_context_sds_secret_config.sds_config):
        api = source.api_config_source
        assert api.api_type == api.GRPC
        assert api.grpc_services[0].envoy_grpc.cluster_name == bs.SDS_CLUSTER
        assert source.initial_fetch_timeout.ToSeconds() == 0
    meta = doc["node"]["metadata"]["PROXY_CONFIG"]
    assert meta["controlPlaneAuthPolicy"] == "MUTUAL_TLS"
    assert meta["discoveryAddress"] == "127.0.0.1:15012"


def test_plaintext_xds_keeps_sds_and_the_default_stays_unchanged() -> None:
    doc = agent_bootstrap(xds_tls=False, xds_address="127.0.0.1:15010")
    assert "transport_socket" not in clusters(doc)[bs.XDS_CLUSTER]
    assert bs.SDS_CLUSTER in clusters(doc)
    plain = bs.build_bootstrap(name="a", namespace="default")
    assert set(clusters(plain)) == {bs.XDS_CLUSTER}
    assert "transport_socket" not in clusters(plain)[bs.XDS_CLUSTER]
    assert "controlPlaneAuthPolicy" not in plain["node"]["metadata"]["PROXY_CONFIG"]


def test_bad_socket_path_and_san_are_refused() -> None:
    with pytest.raises(bs.BootstrapError, match="sds socket"):
        agent_bootstrap(sds_socket="/" + "x" * 120)
    with pytest.raises(bs.BootstrapError, match="sds socket"):
        agent_bootstrap(sds_socket="")
    with pytest.raises(bs.BootstrapError, match="control plane SAN"):
        agent_bootstrap(control_plane_san="a b")


def test_sds_secret_config_helper_matches_istio_shape() -> None:
    cfg = bs.sds_secret_config("ROOTCA")
    assert cfg["name"] == "ROOTCA"
    api = cfg["sds_config"]["api_config_source"]
    assert api["grpc_services"] == [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]
    assert api["transport_api_version"] == "V3"


def _envoy() -> str:
    beside = Path(sys.executable).parent / "envoy"
    if not beside.is_file():
        pytest.fail(f"no Envoy binary at {beside}; these tests never skip", pytrace=False)
    return str(beside)


@pytest.mark.parametrize("xds_tls", [True, False])
def test_real_envoy_validates_the_agent_bootstrap(xds_tls: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="mp-validate-") as tmp:
        path = Path(tmp) / "bootstrap.json"
        doc = agent_bootstrap(xds_tls=xds_tls, admin_port=0)
        (ads,) = doc["dynamic_resources"]["ads_config"]["grpc_services"]
        assert ads["envoy_grpc"]["retry_policy"]["retry_back_off"] == {
            "base_interval": "0.5s",
            "max_interval": "5s",
        }
        path.write_text(json.dumps(doc))
        argv = [_envoy(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"]
        done = subprocess.run(
            [*argv, "--log-level", "warn"], capture_output=True, text=True, timeout=60
        )
    assert done.returncode == 0, done.stdout + done.stderr
