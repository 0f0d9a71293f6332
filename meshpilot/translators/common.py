"""Small protobuf builders shared by the translators."""

from __future__ import annotations

import math

from envoy.config.core.v3 import address_pb2, config_source_pb2
from google.protobuf import any_pb2, duration_pb2, message, wrappers_pb2

from meshpilot.addresses import is_ip as is_ip
from meshpilot.addresses import is_ipv4 as is_ipv4
from meshpilot.durations import parse_duration
from meshpilot.model.authz_rules import ip_network

TYPE_URL_PREFIX = "type.googleapis.com/"
HTTP_PROTOCOL_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

# Ports the sidecar itself owns (Istio's reserved set): an outbound or inbound
# listener there would fight Envoy's own listeners or the capture redirect.
PROXY_ADMIN_PORT = 15000
PROXY_OUTBOUND_PORT = 15001
PROXY_INBOUND_PORT = 15006
RESERVED_PROXY_PORTS = frozenset({15000, 15001, 15004, 15006, 15008, 15020, 15021, 15053, 15090})
# Source address of traffic Envoy sends to the local app, so iptables can tell it
# from traffic to capture (Istio's InboundPassthroughBindIpv4).
INBOUND_PASSTHROUGH_BIND_V4 = "127.0.0.6"
INBOUND_PASSTHROUGH_BIND_V6 = "::6"

MAX_UINT32 = 2**32 - 1
# Largest protobuf Duration Envoy accepts without overflowing nanoseconds (Istio's maxSecondsValue).
MAX_DURATION_SECONDS = (2**63 - 1 - 999_999_999) // 1_000_000_000


def pack(msg: message.Message) -> any_pb2.Any:
    """Wrap in Any with a deterministic inner serialization (maps inside stay stable)."""
    out = any_pb2.Any()
    out.Pack(msg, type_url_prefix=TYPE_URL_PREFIX, deterministic=True)
    return out


def duration(seconds: float) -> duration_pb2.Duration:
    whole = math.floor(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def duration_from_text(text: str, default: float) -> duration_pb2.Duration:
    """A Go-style duration string (`10s`, `1m30s`); `default` seconds when it is invalid."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        seconds = default
    return duration(seconds)


def uint32(value: int) -> wrappers_pb2.UInt32Value:
    return wrappers_pb2.UInt32Value(value=value)


def bool_value(value: bool) -> wrappers_pb2.BoolValue:
    return wrappers_pb2.BoolValue(value=value)


def socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def pipe_address(path: str) -> address_pb2.Address:
    return address_pb2.Address(pipe=address_pb2.Pipe(path=path))


def ads_config_source() -> config_source_pb2.ConfigSource:
    """ADS, v3, and no initial fetch timeout: Envoy waits for the resource, as with Istio."""
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        initial_fetch_timeout=duration(0),
        resource_api_version=config_source_pb2.V3,
    )


def cidr_range(text: str) -> address_pb2.CidrRange | None:
    """An IP or CIDR as a CidrRange; None when it is neither (hostnames, typos)."""
    net = ip_network(text)
    if net is None:
        return None
    return address_pb2.CidrRange(
        address_prefix=str(net.network_address), prefix_len=uint32(net.prefixlen)
    )
