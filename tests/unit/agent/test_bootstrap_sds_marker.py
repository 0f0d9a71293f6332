"""The agent's bootstrap tells the control plane it can resolve SDS secrets."""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from meshpilot.agent.bootstrap import build_bootstrap
from meshpilot.model.proxy import Proxy
from meshpilot.translators.tls import SDS_METADATA, proxy_has_sds


def _proxy(**kwargs: object) -> Proxy:
    boot = build_bootstrap(name="web-1", namespace="default", **kwargs)  # type: ignore[arg-type]
    return Proxy.from_node(json_format.ParseDict(boot["node"], base_pb2.Node()))


def test_agent_bootstrap_marks_sds_even_with_plaintext_xds() -> None:
    proxy = _proxy(sds_socket="/tmp/x/sds.sock", xds_tls=False)
    assert proxy.metadata[SDS_METADATA] == "true"
    assert proxy_has_sds(proxy)


def test_plain_bootstrap_has_no_sds_marker() -> None:
    proxy = _proxy()
    assert SDS_METADATA not in proxy.metadata
    assert not proxy_has_sds(proxy)
