"""Pieces of a VirtualService HTTP rule as Envoy protos, after Istio's route.go and
route/retry: matches, header operations, retries, faults, CORS, redirects, mirrors.

Pure functions of the API models; which rule applies where is decided in
http_route.py.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import (
    previous_priorities_config_pb2,
)
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2

from meshpilot.api.networking import (
    CorsPolicy,
    HeaderOperations,
    Headers,
    HTTPDirectResponse,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRedirect,
    HTTPRetry,
    Percent,
    StringMatch,
)
from meshpilot.translators.common import bool_value, duration, pack, uint32

HEADER_METHOD = ":method"
HEADER_AUTHORITY = ":authority"
HEADER_SCHEME = ":scheme"

PREVIOUS_HOSTS_PREDICATE = "envoy.retry_host_predicates.previous_hosts"
PREVIOUS_PRIORITIES = "envoy.retry_priorities.previous_priorities"
# Istio's default retry policy for mesh routes (route/retry DefaultPolicy).
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_RETRIES = 2
DEFAULT_HOST_SELECTION_RETRIES = 5
RETRIABLE_STATUS_CODES = "retriable-status-codes"

# Istio's names for gRPC status codes in `fault.abort.grpcStatus`.
GRPC_STATUS = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}

REDIRECT_CODES = {
    301: rc.RedirectAction.MOVED_PERMANENTLY,
    302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER,
    307: rc.RedirectAction.TEMPORARY_REDIRECT,
    308: rc.RedirectAction.PERMANENT_REDIRECT,
}

# Reason phrases exist for these: Istio treats such numbers in `retryOn` as status codes.
_HTTP_STATUS_CODES = frozenset(
    (
        *(100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226),
        *(300, 301, 302, 303, 304, 305, 307, 308),
        *range(400, 419),
        *(421, 422, 423, 424, 425, 426, 428, 429, 431, 451),
        *(500, 501, 502, 503, 504, 505, 506, 507, 508, 510, 511),
    )
)


# --- matches ----------------------------------------------------------------------------


def is_presence(sm: StringMatch | None) -> bool:
    """`{}` (and Istio's legacy regex `*`) means "the header is present"."""
    if sm is None:
        return True
    if sm.exact is None and sm.prefix is None and sm.regex is None:
        return True
    return sm.regex == "*"


def string_matcher(sm: StringMatch) -> string_pb2.StringMatcher:
    if sm.exact is not None:
        return string_pb2.StringMatcher(exact=sm.exact)
    if sm.prefix is not None:
        return string_pb2.StringMatcher(prefix=sm.prefix)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=sm.regex or ""))


def header_matcher(name: str, sm: StringMatch | None) -> rc.HeaderMatcher:
    if is_presence(sm):
        return rc.HeaderMatcher(name=name, present_match=True)
    assert sm is not None
    return rc.HeaderMatcher(name=name, string_match=string_matcher(sm))


def route_match(match: HTTPMatchRequest | None) -> rc.RouteMatch:
    """Istio's TranslateRouteMatch; header and query matchers in a stable order."""
    out = rc.RouteMatch(prefix="/")
    if match is None:
        return out
    headers = [header_matcher(name, sm) for name, sm in match.headers.items()]
    for name, sm in match.without_headers.items():
        m = header_matcher(name, sm)
        m.invert_match = True
        if not is_presence(sm):
            # An absent header is "not equal" too; Envoy rejects this with present_match.
            m.treat_missing_header_as_empty = True
        headers.append(m)
    headers.sort(key=lambda h: h.name)
    uri = match.uri
    if uri is not None and not is_presence(uri):
        if uri.exact is not None:
            out.path = uri.exact
        elif uri.prefix is not None:
            out.prefix = uri.prefix
        else:
            out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=uri.regex or ""))
    out.case_sensitive.CopyFrom(bool_value(not match.ignore_uri_case))
    pseudo: tuple[tuple[str, StringMatch | None], ...] = (
        (HEADER_METHOD, match.method),
        (HEADER_AUTHORITY, match.authority),
        (HEADER_SCHEME, match.scheme),
    )
    for name, pseudo_match in pseudo:
        if pseudo_match is not None:
            headers.append(header_matcher(name, pseudo_match))
    out.headers.extend(headers)
    for name in sorted(match.query_params):
        sm = match.query_params[name]
        q = rc.QueryParameterMatcher(name=name)
        if is_presence(sm):
            q.present_match = True
        else:
            q.string_match.CopyFrom(string_matcher(sm))
        out.query_parameters.append(q)
    return out


def is_catch_all(match: rc.RouteMatch) -> bool:
    """Istio's IsCatchAllRoute: every request fits, so later rules are unreachable."""
    which = match.WhichOneof("path_specifier")
    if which == "prefix":
        path_all = match.prefix == "/"
    elif which == "safe_regex":
        path_all = match.safe_regex.regex == ".*"
    else:
        path_all = False
    return path_all and not match.headers and not match.query_parameters


# --- headers ----------------------------------------------------------------------------


@dataclass
class HeaderOps:
    request_add: list[base_pb2.HeaderValueOption] = field(default_factory=list)
    request_remove: list[str] = field(default_factory=list)
    response_add: list[base_pb2.HeaderValueOption] = field(default_factory=list)
    response_remove: list[str] = field(default_factory=list)
    # `set`/`add` of `:authority` or `host` becomes a host rewrite, as in Istio.
    authority: str = ""


def _is_internal(name: str) -> bool:
    return name.startswith(":") or name.lower() == "host"


def _is_authority(name: str) -> bool:
    return name.lower() in (":authority", "host")


def _header_options(
    values: dict[str, str], append: bool
) -> tuple[list[base_pb2.HeaderValueOption], str]:
    authority = ""
    out = []
    action = (
        base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD
        if append
        else base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    )
    for key in sorted(values):
        if _is_authority(key):
            authority = values[key]
        if _is_internal(key):
            continue  # Envoy refuses to modify pseudo-headers and Host this way
        out.append(
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=key, value=values[key]), append_action=action
            )
        )
    return out, authority


def header_ops(headers: Headers) -> HeaderOps:
    """Istio's TranslateHeadersOperations: `set` overwrites, `add` appends."""
    req = headers.request or HeaderOperations()
    resp = headers.response or HeaderOperations()
    req_set, set_authority = _header_options(req.set, append=False)
    req_add, add_authority = _header_options(req.add, append=True)
    resp_set, _ = _header_options(resp.set, append=False)
    resp_add, _ = _header_options(resp.add, append=True)
    return HeaderOps(
        request_add=req_set + req_add,
        request_remove=[h for h in req.remove if not _is_internal(h)],
        response_add=resp_set + resp_add,
        response_remove=[h for h in resp.remove if not _is_internal(h)],
        authority=set_authority or add_authority,
    )


# --- retries ----------------------------------------------------------------------------


# Built once: packing an Any per route costs more than copying a finished message.
_PREVIOUS_HOSTS = rc.RetryPolicy.RetryHostPredicate(
    name=PREVIOUS_HOSTS_PREDICATE, typed_config=pack(previous_hosts_pb2.PreviousHostsPredicate())
)


def default_retry_policy(consistent_hash: bool = False) -> rc.RetryPolicy:
    """Istio's: two retries on connect failures, resets and 503. On another host,
    unless the route hashes to a host: then retries stay on it."""
    policy = rc.RetryPolicy(
        retry_on=DEFAULT_RETRY_ON,
        num_retries=uint32(DEFAULT_RETRIES),
        retriable_status_codes=[503],
        host_selection_retry_max_attempts=DEFAULT_HOST_SELECTION_RETRIES,
    )
    if not consistent_hash:
        policy.retry_host_predicate.append(_PREVIOUS_HOSTS)
    return policy


def parse_retry_on(text: str) -> tuple[str, list[int]]:
    """Split `retryOn` into Envoy conditions and HTTP status codes."""
    conditions: list[str] = []
    codes: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit() and int(part) in _HTTP_STATUS_CODES:
            codes.append(int(part))
        else:
            conditions.append(part)
    return ",".join(conditions), codes


def retry_policy(retries: HTTPRetry | None, consistent_hash: bool) -> rc.RetryPolicy | None:
    """Istio's ConvertPolicy: the default when unset, none for `attempts: 0`, else the
    default with the user's overrides."""
    out = default_retry_policy(consistent_hash)
    if retries is None:
        return out
    if retries.attempts <= 0:
        return None
    out.num_retries.value = retries.attempts
    if retries.retry_on:
        retry_on, codes = parse_retry_on(retries.retry_on)
        if codes and RETRIABLE_STATUS_CODES not in retry_on:
            # Status codes alone do nothing in Envoy without this condition.
            retry_on = ",".join(p for p in (retry_on, RETRIABLE_STATUS_CODES) if p)
        out.retry_on = retry_on
        del out.retriable_status_codes[:]
        out.retriable_status_codes.extend(codes)
    if retries.per_try_timeout is not None:
        out.per_try_timeout.CopyFrom(duration(retries.per_try_timeout))
    if retries.retry_ignore_previous_hosts is not None:
        del out.retry_host_predicate[:]
        if retries.retry_ignore_previous_hosts:
            out.retry_host_predicate.append(_PREVIOUS_HOSTS)
    if retries.retry_remote_localities:
        out.retry_priority.name = PREVIOUS_PRIORITIES
        out.retry_priority.typed_config.CopyFrom(
            pack(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=2))
        )
    if retries.backoff is not None:
        out.retry_back_off.base_interval.CopyFrom(duration(retries.backoff))
    return out


# --- percentages, faults, mirrors -------------------------------------------------------


def fractional_percent(p: Percent) -> percent_pb2.FractionalPercent:
    """Istio's: per million, so that 0.1% survives."""
    return percent_pb2.FractionalPercent(
        numerator=round(p.value * 10000), denominator=percent_pb2.FractionalPercent.MILLION
    )


def integer_percent(p: int) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(
        numerator=p, denominator=percent_pb2.FractionalPercent.HUNDRED
    )


def http_fault(fault: HTTPFaultInjection) -> fault_pb2.HTTPFault | None:
    """Istio's TranslateFault; None when nothing Envoy supports is left."""
    out = fault_pb2.HTTPFault()
    delay = fault.delay
    if delay is not None and delay.fixed_delay is not None:
        # Exponential delays are not supported by Envoy (Istio drops them too).
        d = out.delay
        d.fixed_delay.CopyFrom(duration(delay.fixed_delay))
        if delay.percentage is not None:
            d.percentage.CopyFrom(fractional_percent(delay.percentage))
        else:
            d.percentage.CopyFrom(integer_percent(delay.percent or 0))
    abort = fault.abort
    if abort is not None:
        a = fault_pb2.FaultAbort()
        if abort.http_status is not None:
            a.http_status = abort.http_status
        elif abort.grpc_status is not None and abort.grpc_status.upper() in GRPC_STATUS:
            a.grpc_status = GRPC_STATUS[abort.grpc_status.upper()]
        else:
            a = None  # http2Error and unknown gRPC names: Istio drops the abort too
        if a is not None:
            if abort.percentage is not None:
                a.percentage.CopyFrom(fractional_percent(abort.percentage))
            out.abort.CopyFrom(a)
    if not out.HasField("delay") and not out.HasField("abort"):
        return None
    return out


def mirror_fraction(
    percentage: Percent | None, percent: int | None
) -> base_pb2.RuntimeFractionalPercent | None:
    """Istio's MirrorPercent: 100% by default, None (no mirroring) for an explicit 0."""
    if percentage is not None:
        if percentage.value <= 0:
            return None
        return base_pb2.RuntimeFractionalPercent(default_value=fractional_percent(percentage))
    if percent is not None:
        if percent <= 0:
            return None
        return base_pb2.RuntimeFractionalPercent(default_value=integer_percent(percent))
    return base_pb2.RuntimeFractionalPercent(default_value=integer_percent(100))


# --- CORS, redirects, direct responses --------------------------------------------------


def cors_policy(cors: CorsPolicy) -> cors_pb2.CorsPolicy:
    """Istio's TranslateCORSPolicy, as per-route config of the cors filter."""
    out = cors_pb2.CorsPolicy(
        allow_methods=",".join(cors.allow_methods),
        allow_headers=",".join(cors.allow_headers),
        expose_headers=",".join(cors.expose_headers),
        filter_enabled=base_pb2.RuntimeFractionalPercent(default_value=integer_percent(100)),
        # Envoy >= 1.30 stops forwarding unmatched preflights by default; Istio keeps
        # the old behaviour unless told IGNORE.
        forward_not_matching_preflights=bool_value(cors.unmatched_preflights != "IGNORE"),
    )
    if cors.allow_origins:
        out.allow_origin_string_match.extend(string_matcher(o) for o in cors.allow_origins)
    elif cors.allow_origin:
        out.allow_origin_string_match.extend(
            string_pb2.StringMatcher(exact=o) for o in cors.allow_origin
        )
    if cors.allow_credentials is not None:
        out.allow_credentials.CopyFrom(bool_value(cors.allow_credentials))
    if cors.max_age is not None:
        out.max_age = str(int(cors.max_age))
    return out


def redirect_action(redirect: HTTPRedirect, listener_port: int) -> rc.RedirectAction | None:
    """Istio's ApplyRedirect for sidecars (plain HTTP); None for a code Envoy lacks."""
    code = REDIRECT_CODES.get(redirect.redirect_code)
    if code is None:
        return None
    out = rc.RedirectAction(host_redirect=redirect.authority, response_code=code)
    if redirect.uri:
        out.path_redirect = redirect.uri
    if redirect.scheme:
        out.scheme_redirect = redirect.scheme
    if redirect.port is not None or redirect.derive_port is not None:
        if redirect.port is not None:
            out.port_redirect = redirect.port
        elif redirect.derive_port == "FROM_REQUEST_PORT":
            # Envoy cannot derive it, but routes are built per listener port.
            out.port_redirect = listener_port
        scheme = redirect.scheme or "http"
        if (out.port_redirect, scheme) in ((80, "http"), (443, "https")):
            out.port_redirect = 0  # no explicit default port in the Location
    return out


def direct_response(resp: HTTPDirectResponse) -> rc.DirectResponseAction:
    out = rc.DirectResponseAction(status=resp.status)
    body = resp.body
    if body is not None:
        if body.string is not None:
            out.body.inline_string = body.string
        elif body.bytes is not None:
            try:
                out.body.inline_bytes = base64.b64decode(body.bytes, validate=True)
            except (binascii.Error, ValueError):
                out.body.inline_bytes = body.bytes.encode()
    return out
