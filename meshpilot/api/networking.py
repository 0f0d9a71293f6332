"""Typed models of networking.istio.io specs (v1, v1beta1, v1alpha3 share them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from meshpilot.api.base import Duration, IstioModel, Labels, Port, Regex

# --- shared ---------------------------------------------------------------------------


class PortSelector(IstioModel):
    number: Port


class ServicePort(IstioModel):
    """Port of a ServiceEntry, Sidecar listener or Gateway server."""

    number: Port
    protocol: str = ""
    name: str = ""
    target_port: Port | None = None


class WorkloadSelector(IstioModel):
    labels: Labels = Field(default_factory=dict)


class StringMatch(IstioModel):
    """`exact`, `prefix` or `regex` (one of); `{}` means presence for headers."""

    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None

    @model_validator(mode="after")
    def _one_of(self) -> StringMatch:
        if sum(v is not None for v in (self.exact, self.prefix, self.regex)) > 1:
            raise ValueError("only one of exact, prefix or regex may be set")
        return self


class Percent(IstioModel):
    value: float = Field(ge=0, le=100)


# --- WorkloadEntry and ServiceEntry ---------------------------------------------------


class WorkloadEntrySpec(IstioModel):
    address: str = ""
    ports: dict[str, Port] = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)
    network: str = ""
    locality: str = ""
    weight: int = Field(default=0, ge=0, le=2**31 - 1)
    service_account: str = ""


class ServiceEntrySpec(IstioModel):
    hosts: list[str] = Field(min_length=1)
    addresses: list[str] = Field(default_factory=list)
    ports: list[ServicePort] = Field(default_factory=list)
    location: Literal["MESH_EXTERNAL", "MESH_INTERNAL"] = "MESH_EXTERNAL"
    resolution: Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"] = "NONE"
    endpoints: list[WorkloadEntrySpec] = Field(default_factory=list)
    workload_selector: WorkloadSelector | None = None
    export_to: list[str] = Field(default_factory=list)
    subject_alt_names: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _endpoints_xor_selector(self) -> ServiceEntrySpec:
        if self.endpoints and self.workload_selector is not None:
            raise ValueError("only one of endpoints or workloadSelector may be set")
        if self.resolution == "STATIC" and self.workload_selector is None:
            for i, ep in enumerate(self.endpoints):
                if not ep.address:
                    raise ValueError(f"endpoints[{i}].address is required for STATIC resolution")
        return self


# --- Sidecar --------------------------------------------------------------------------

CaptureMode = Literal["DEFAULT", "IPTABLES", "NONE"]


class OutboundTrafficPolicy(IstioModel):
    mode: Literal["REGISTRY_ONLY", "ALLOW_ANY"] = "ALLOW_ANY"
    egress_proxy: dict[str, Any] | None = None


class ServerTLSSettings(IstioModel):
    https_redirect: bool = False
    mode: Literal[
        "PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"
    ] = "PASSTHROUGH"
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    ca_crl: str = ""
    credential_name: str = ""
    credential_names: list[str] = Field(default_factory=list)
    subject_alt_names: list[str] = Field(default_factory=list)
    verify_certificate_spki: list[str] = Field(default_factory=list)
    verify_certificate_hash: list[str] = Field(default_factory=list)
    min_protocol_version: str = "TLS_AUTO"
    max_protocol_version: str = "TLS_AUTO"
    cipher_suites: list[str] = Field(default_factory=list)


class TCPSettings(IstioModel):
    class TcpKeepalive(IstioModel):
        probes: int | None = Field(default=None, ge=0)
        time: Duration | None = None
        interval: Duration | None = None

    max_connections: int | None = Field(default=None, ge=0)
    connect_timeout: Duration | None = None
    tcp_keepalive: TcpKeepalive | None = None
    max_connection_duration: Duration | None = None
    idle_timeout: Duration | None = None


class HTTPSettings(IstioModel):
    http1_max_pending_requests: int | None = Field(default=None, ge=0)
    http2_max_requests: int | None = Field(default=None, ge=0)
    max_requests_per_connection: int | None = Field(default=None, ge=0)
    max_retries: int | None = Field(default=None, ge=0)
    idle_timeout: Duration | None = None
    h2_upgrade_policy: Literal["DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"] = "DEFAULT"
    use_client_protocol: bool = False
    max_concurrent_streams: int | None = Field(default=None, ge=0)


class ConnectionPoolSettings(IstioModel):
    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class IstioIngressListener(IstioModel):
    port: ServicePort
    bind: str = ""
    capture_mode: CaptureMode = "DEFAULT"
    default_endpoint: str = ""
    tls: ServerTLSSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None


class IstioEgressListener(IstioModel):
    port: ServicePort | None = None
    bind: str = ""
    capture_mode: CaptureMode = "DEFAULT"
    hosts: list[str] = Field(min_length=1)


class SidecarSpec(IstioModel):
    workload_selector: WorkloadSelector | None = None
    ingress: list[IstioIngressListener] = Field(default_factory=list)
    egress: list[IstioEgressListener] = Field(default_factory=list)
    outbound_traffic_policy: OutboundTrafficPolicy | None = None
    inbound_connection_pool: ConnectionPoolSettings | None = None


# --- Gateway --------------------------------------------------------------------------


class Server(IstioModel):
    port: ServicePort
    bind: str = ""
    hosts: list[str] = Field(min_length=1)
    tls: ServerTLSSettings | None = None
    name: str = ""
    default_endpoint: str = ""


class GatewaySpec(IstioModel):
    selector: Labels = Field(default_factory=dict)
    servers: list[Server] = Field(default_factory=list)


# --- DestinationRule ------------------------------------------------------------------


class ConsistentHashLB(IstioModel):
    class HTTPCookie(IstioModel):
        name: str
        path: str = ""
        ttl: Duration | None = None

    class RingHash(IstioModel):
        minimum_ring_size: int | None = Field(default=None, ge=0)

    class Maglev(IstioModel):
        table_size: int | None = Field(default=None, ge=0)

    http_header_name: str | None = None
    http_cookie: HTTPCookie | None = None
    use_source_ip: bool | None = None
    http_query_parameter_name: str | None = None
    ring_hash: RingHash | None = None
    maglev: Maglev | None = None
    minimum_ring_size: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_key(self) -> ConsistentHashLB:
        keys = (
            self.http_header_name,
            self.http_cookie,
            self.use_source_ip or None,
            self.http_query_parameter_name,
        )
        if sum(k is not None for k in keys) != 1:
            raise ValueError(
                "exactly one of httpHeaderName, httpCookie, useSourceIp or "
                "httpQueryParameterName must be set"
            )
        return self


class LocalityLbSetting(IstioModel):
    class Distribute(IstioModel):
        from_: str = Field(alias="from")
        to: dict[str, int] = Field(default_factory=dict)

    class Failover(IstioModel):
        from_: str = Field(alias="from")
        to: str

    distribute: list[Distribute] = Field(default_factory=list)
    failover: list[Failover] = Field(default_factory=list)
    failover_priority: list[str] = Field(default_factory=list)
    enabled: bool | None = None


class LoadBalancerSettings(IstioModel):
    simple: (
        Literal[
            "UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST"
        ]
        | None
    ) = None
    consistent_hash: ConsistentHashLB | None = None
    locality_lb_setting: LocalityLbSetting | None = None
    warmup_duration_secs: Duration | None = None


class OutlierDetection(IstioModel):
    split_external_local_origin_errors: bool = False
    consecutive_local_origin_failures: int | None = Field(default=None, ge=0)
    consecutive_gateway_errors: int | None = Field(default=None, ge=0)
    consecutive_5xx_errors: int | None = Field(default=None, ge=0, alias="consecutive5xxErrors")
    consecutive_errors: int | None = Field(default=None, ge=0)
    interval: Duration | None = None
    base_ejection_time: Duration | None = None
    max_ejection_percent: int | None = Field(default=None, ge=0, le=100)
    min_health_percent: int | None = Field(default=None, ge=0, le=100)


class ClientTLSSettings(IstioModel):
    mode: Literal["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"] = "DISABLE"
    client_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    subject_alt_names: list[str] = Field(default_factory=list)
    sni: str = ""
    insecure_skip_verify: bool | None = None
    ca_crl: str = ""

    @model_validator(mode="after")
    def _mutual_needs_a_certificate(self) -> ClientTLSSettings:
        if self.mode == "MUTUAL" and not self.credential_name:
            if not self.client_certificate or not self.private_key:
                raise ValueError(
                    "MUTUAL mode needs clientCertificate and privateKey (or credentialName)"
                )
        return self


class PortTrafficPolicy(IstioModel):
    port: PortSelector | None = None
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None


class TrafficPolicy(IstioModel):
    load_balancer: LoadBalancerSettings | None = None
    connection_pool: ConnectionPoolSettings | None = None
    outlier_detection: OutlierDetection | None = None
    tls: ClientTLSSettings | None = None
    port_level_settings: list[PortTrafficPolicy] = Field(default_factory=list)
    tunnel: dict[str, Any] | None = None
    proxy_protocol: dict[str, Any] | None = None


class Subset(IstioModel):
    # A DNS label: the name becomes part of cluster names and SNI.
    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    labels: Labels = Field(default_factory=dict)
    traffic_policy: TrafficPolicy | None = None


class DestinationRuleSpec(IstioModel):
    host: str = Field(min_length=1)
    traffic_policy: TrafficPolicy | None = None
    subsets: list[Subset] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)
    workload_selector: WorkloadSelector | None = None

    @model_validator(mode="after")
    def _unique_subsets(self) -> DestinationRuleSpec:
        seen: set[str] = set()
        for i, s in enumerate(self.subsets):
            if s.name in seen:
                raise ValueError(f"subsets[{i}].name {s.name!r} is defined twice")
            seen.add(s.name)
        return self


# --- VirtualService -------------------------------------------------------------------


class Destination(IstioModel):
    host: str = Field(min_length=1)
    subset: str = ""
    port: PortSelector | None = None


class HeaderOperations(IstioModel):
    set: dict[str, str] = Field(default_factory=dict)
    add: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class Headers(IstioModel):
    request: HeaderOperations | None = None
    response: HeaderOperations | None = None


class HTTPMatchRequest(IstioModel):
    name: str = ""
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    port: Port | None = None
    source_labels: Labels = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    query_params: dict[str, StringMatch] = Field(default_factory=dict)
    ignore_uri_case: bool = False
    without_headers: dict[str, StringMatch] = Field(default_factory=dict)
    source_namespace: str = ""
    stat_prefix: str = ""


class HTTPRouteDestination(IstioModel):
    destination: Destination
    weight: int = Field(default=0, ge=0)
    headers: Headers | None = None


class RouteDestination(IstioModel):
    destination: Destination
    weight: int = Field(default=0, ge=0)


class HTTPRedirect(IstioModel):
    uri: str = ""
    authority: str = ""
    port: Port | None = None
    derive_port: Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"] | None = None
    scheme: str = ""
    redirect_code: int = Field(default=301, ge=300, le=399)


class HTTPBody(IstioModel):
    string: str | None = None
    bytes: str | None = None


class HTTPDirectResponse(IstioModel):
    status: int = Field(ge=200, le=599)
    body: HTTPBody | None = None


class RegexRewrite(IstioModel):
    match: Regex
    rewrite: str


class HTTPRewrite(IstioModel):
    uri: str = ""
    authority: str = ""
    uri_regex_rewrite: RegexRewrite | None = None


class HTTPRetry(IstioModel):
    attempts: int = Field(default=0, ge=0)
    per_try_timeout: Duration | None = None
    retry_on: str = ""
    retry_remote_localities: bool | None = None
    retry_ignore_previous_hosts: bool | None = None
    backoff: Duration | None = None


class HTTPFaultInjection(IstioModel):
    class Delay(IstioModel):
        fixed_delay: Duration | None = None
        exponential_delay: Duration | None = None
        percentage: Percent | None = None
        percent: int | None = Field(default=None, ge=0, le=100)

    class Abort(IstioModel):
        http_status: int | None = Field(default=None, ge=200, le=599)
        grpc_status: str | None = None
        http2_error: str | None = None
        percentage: Percent | None = None

    delay: Delay | None = None
    abort: Abort | None = None


class CorsPolicy(IstioModel):
    allow_origins: list[StringMatch] = Field(default_factory=list)
    allow_origin: list[str] = Field(default_factory=list)
    allow_methods: list[str] = Field(default_factory=list)
    allow_headers: list[str] = Field(default_factory=list)
    expose_headers: list[str] = Field(default_factory=list)
    max_age: Duration | None = None
    allow_credentials: bool | None = None
    unmatched_preflights: Literal["UNSPECIFIED", "FORWARD", "IGNORE"] = "UNSPECIFIED"


class Delegate(IstioModel):
    name: str
    namespace: str = ""


class HTTPMirrorPolicy(IstioModel):
    destination: Destination
    percentage: Percent | None = None


class HTTPRoute(IstioModel):
    name: str = ""
    match: list[HTTPMatchRequest] = Field(default_factory=list)
    route: list[HTTPRouteDestination] = Field(default_factory=list)
    redirect: HTTPRedirect | None = None
    direct_response: HTTPDirectResponse | None = None
    delegate: Delegate | None = None
    rewrite: HTTPRewrite | None = None
    timeout: Duration | None = None
    retries: HTTPRetry | None = None
    fault: HTTPFaultInjection | None = None
    mirror: Destination | None = None
    mirrors: list[HTTPMirrorPolicy] = Field(default_factory=list)
    mirror_percentage: Percent | None = None
    mirror_percent: int | None = Field(default=None, ge=0, le=100)
    cors_policy: CorsPolicy | None = None
    headers: Headers | None = None

    @model_validator(mode="after")
    def _action(self) -> HTTPRoute:
        actions = [
            n
            for n, v in (
                ("route", self.route),
                ("redirect", self.redirect),
                ("directResponse", self.direct_response),
                ("delegate", self.delegate),
            )
            if v
        ]
        if len(actions) > 1 and not (set(actions) == {"redirect", "directResponse"}):
            raise ValueError(f"only one of route, redirect, directResponse, delegate: {actions}")
        if not actions:
            raise ValueError("one of route, redirect, directResponse or delegate is required")
        return self


class L4MatchAttributes(IstioModel):
    destination_subnets: list[str] = Field(default_factory=list)
    port: Port | None = None
    source_labels: Labels = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: str = ""
    source_subnet: str = ""


class TLSMatchAttributes(IstioModel):
    sni_hosts: list[str] = Field(min_length=1)
    destination_subnets: list[str] = Field(default_factory=list)
    port: Port | None = None
    source_labels: Labels = Field(default_factory=dict)
    gateways: list[str] = Field(default_factory=list)
    source_namespace: str = ""


class TCPRoute(IstioModel):
    match: list[L4MatchAttributes] = Field(default_factory=list)
    route: list[RouteDestination] = Field(default_factory=list)


class TLSRoute(IstioModel):
    match: list[TLSMatchAttributes] = Field(min_length=1)
    route: list[RouteDestination] = Field(default_factory=list)


class VirtualServiceSpec(IstioModel):
    hosts: list[str] = Field(default_factory=list)
    gateways: list[str] = Field(default_factory=list)
    http: list[HTTPRoute] = Field(default_factory=list)
    tls: list[TLSRoute] = Field(default_factory=list)
    tcp: list[TCPRoute] = Field(default_factory=list)
    export_to: list[str] = Field(default_factory=list)
