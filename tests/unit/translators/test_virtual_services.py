"""VirtualService `http` rules in sidecar outbound routes, on Istio's bookinfo samples."""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.v3 import percent_pb2

from meshpilot.translators.http_route import CORS_FILTER, FAULT_FILTER
from meshpilot.translators.routes import build_route_configs, source_labels_key

from ._helpers import dedent, serialized, unpack
from ._samples import (
    DETAILS,
    PRODUCTPAGE,
    RATINGS,
    REVIEWS,
    bookinfo,
    networking,
    productpage,
    route_config,
    routes_of,
    vhost,
)

DR_ALL = networking("destination-rule-all.yaml")
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD


def cluster(subset: str, host: str = REVIEWS, port: int = 9080) -> str:
    return f"outbound|{port}|{subset}|{host}"


def vs(name: str, body: str, namespace: str = "default", extra_meta: str = "") -> str:
    """A VirtualService document; `body` is its spec, indented by the caller's dedent."""
    spec = "\n".join("  " + line for line in dedent(body).splitlines())
    return (
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        f"metadata: {{name: {name}, namespace: {namespace}{extra_meta}}}\nspec:\n{spec}"
    )


def reviews_vs(http: str, **kw: str) -> str:
    rules = "\n".join("  " + line for line in dedent(http).splitlines())
    return vs("reviews", f"hosts: [reviews]\nhttp:\n{rules}", **kw)


def only_route(*docs: str, host: str = REVIEWS) -> rc.Route:
    (route,) = routes_of(bookinfo(DR_ALL, *docs), host)
    return route


# --- Istio's samples ----------------------------------------------------------------------


def test_all_v1_routes_every_service_to_its_v1_subset() -> None:
    rc_ = route_config(bookinfo(DR_ALL, networking("virtual-service-all-v1.yaml")))
    for host in (PRODUCTPAGE, REVIEWS, RATINGS, DETAILS):
        (route,) = vhost(rc_, host).routes
        assert route.route.cluster == cluster("v1", host)
        assert route.match.prefix == "/"
        assert route.decorator.operation == f"{host}:9080/*"
        # Istio's defaults for a rule without timeout or retries.
        assert route.route.HasField("timeout") and route.route.timeout.seconds == 0
        assert route.route.retry_policy.num_retries.value == 2
        assert list(route.route.retry_policy.retriable_status_codes) == [503]
        assert [p.name for p in route.route.retry_policy.retry_host_predicate] == [
            "envoy.retry_host_predicates.previous_hosts"
        ]
        md = route.metadata.filter_metadata["istio"]["config"]
        assert md == f"/apis/networking.istio.io/v1/namespaces/default/virtual-service/{host[:-26]}"


def test_reviews_test_v2_sends_jason_to_v2_and_everyone_else_to_v1() -> None:
    jason, rest = routes_of(
        bookinfo(DR_ALL, networking("virtual-service-reviews-test-v2.yaml")), REVIEWS
    )
    (header,) = jason.match.headers
    assert header.name == "end-user"
    assert header.string_match.exact == "jason"
    assert jason.match.case_sensitive.value is True
    assert jason.route.cluster == cluster("v2")
    # The rule without match is the catch-all, and nothing else follows (no default route).
    assert rest.match == rc.RouteMatch(prefix="/")
    assert rest.route.cluster == cluster("v1")


@pytest.mark.parametrize(
    ("sample", "split"),
    [
        ("virtual-service-reviews-50-v3.yaml", {"v1": 50, "v3": 50}),
        ("virtual-service-reviews-80-20.yaml", {"v1": 80, "v2": 20}),
        ("virtual-service-reviews-90-10.yaml", {"v1": 90, "v2": 10}),
        ("virtual-service-reviews-v2-v3.yaml", {"v2": 50, "v3": 50}),
    ],
)
def test_weighted_samples(sample: str, split: dict[str, int]) -> None:
    route = only_route(networking(sample))
    wc = route.route.weighted_clusters
    assert {c.name: c.weight.value for c in wc.clusters} == {
        cluster(s): w for s, w in split.items()
    }
    # Envoy >= 1.27 needs no total_weight; Istio no longer sends it.
    assert not wc.HasField("total_weight")
    assert route.decorator.operation == "reviews:9080/*"


def test_ratings_delay_fault_for_jason_only() -> None:
    jason, rest = routes_of(
        bookinfo(DR_ALL, networking("virtual-service-ratings-test-delay.yaml")), RATINGS
    )
    fault = unpack(jason.typed_per_filter_config[FAULT_FILTER], fault_pb2.HTTPFault)
    assert fault.delay.fixed_delay.seconds == 7
    assert fault.delay.percentage == percent_pb2.FractionalPercent(
        numerator=1_000_000, denominator=percent_pb2.FractionalPercent.MILLION
    )
    assert not fault.HasField("abort")
    assert FAULT_FILTER not in rest.typed_per_filter_config
    assert jason.route.cluster == rest.route.cluster == cluster("v1", RATINGS)


def test_ratings_abort_fault() -> None:
    jason, _ = routes_of(
        bookinfo(DR_ALL, networking("virtual-service-ratings-test-abort.yaml")), RATINGS
    )
    fault = unpack(jason.typed_per_filter_config[FAULT_FILTER], fault_pb2.HTTPFault)
    assert fault.abort.http_status == 500
    assert fault.abort.percentage.numerator == 1_000_000
    assert not fault.HasField("delay")


def test_details_fault_sample_stops_after_its_catch_all_rule() -> None:
    # fault-injection-details-v1.yaml carries its own DestinationRule for details.
    (route,) = routes_of(bookinfo(networking("fault-injection-details-v1.yaml")), DETAILS)
    fault = unpack(route.typed_per_filter_config[FAULT_FILTER], fault_pb2.HTTPFault)
    assert fault.abort.http_status == 555
    assert route.route.cluster == cluster("v1", DETAILS)


def test_services_without_virtual_service_keep_the_default_route() -> None:
    rc_ = route_config(bookinfo(DR_ALL, networking("virtual-service-reviews-v3.yaml")))
    (default,) = vhost(rc_, RATINGS).routes
    assert default.name == "default"
    assert default.route.cluster == cluster("", RATINGS)
    (v3,) = vhost(rc_, REVIEWS).routes
    assert v3.route.cluster == cluster("v3")


# --- never a missing cluster ------------------------------------------------------------


def test_unknown_subset_answers_503_naming_the_cluster() -> None:
    # No DestinationRule: subset clusters do not exist, so the route must not name them.
    (route,) = routes_of(bookinfo(networking("virtual-service-reviews-v3.yaml")), REVIEWS)
    assert route.WhichOneof("action") == "direct_response"
    assert route.direct_response.status == 503
    assert cluster("v3") in route.direct_response.body.inline_string


def test_missing_destinations_keep_their_weight_in_the_split() -> None:
    """As in Istio: a destination without cluster keeps its share, which Envoy answers
    with 503 NC, instead of moving that share to the destinations that exist."""
    route = only_route(
        reviews_vs(
            """
            - route:
              - destination: {host: reviews, subset: v1}
                weight: 70
              - destination: {host: reviews, subset: v9}
                weight: 20
              - destination: {host: nowhere}
                weight: 10
            """
        )
    )
    assert [(c.name, c.weight.value) for c in route.route.weighted_clusters.clusters] == [
        (cluster("v1"), 70),
        (cluster("v9"), 20),
        ("outbound|9080||nowhere.default.svc.cluster.local", 10),
    ]
    assert not route.route.hash_policy


def test_split_with_every_destination_missing_answers_503_naming_them() -> None:
    route = only_route(
        reviews_vs(
            """
            - route:
              - destination: {host: reviews, subset: v8}
                weight: 50
              - destination: {host: reviews, subset: v9}
                weight: 50
            """
        )
    )
    assert route.WhichOneof("action") == "direct_response"
    assert route.direct_response.status == 503
    body = route.direct_response.body.inline_string
    assert cluster("v8") in body and cluster("v9") in body


def test_all_weights_zero_answers_503() -> None:
    route = only_route(
        reviews_vs(
            """
            - route:
              - destination: {host: reviews, subset: v1}
              - destination: {host: reviews, subset: v2}
            """
        )
    )
    assert route.direct_response.status == 503


def test_zero_weight_is_left_out_and_single_destination_weight_ignored() -> None:
    split = only_route(
        reviews_vs(
            """
            - route:
              - destination: {host: reviews, subset: v1}
                weight: 100
              - destination: {host: reviews, subset: v2}
                weight: 0
            """
        )
    )
    assert [c.name for c in split.route.weighted_clusters.clusters] == [cluster("v1")]
    single = only_route(
        reviews_vs(
            """
            - route:
              - destination: {host: reviews, subset: v2}
                weight: 30
            """
        )
    )
    assert single.route.cluster == cluster("v2")


def test_short_hosts_resolve_in_the_virtual_service_namespace() -> None:
    # `reviews` written in namespace other means reviews.other: not a known service.
    other = vs(
        "reviews",
        """
        hosts: [reviews.default.svc.cluster.local]
        http:
        - route:
          - destination: {host: reviews}
        """,
        namespace="other",
    )
    (route,) = routes_of(bookinfo(other), REVIEWS)
    assert route.direct_response.status == 503
    assert "reviews.other.svc.cluster.local" in route.direct_response.body.inline_string
    fqdn = other.replace("{host: reviews}", "{host: reviews.default.svc.cluster.local}")
    (route,) = routes_of(bookinfo(fqdn), REVIEWS)
    assert route.route.cluster == cluster("")


def test_oldest_virtual_service_wins_a_host() -> None:
    older = reviews_vs(
        "- route: [{destination: {host: reviews, subset: v2}}]",
        extra_meta=", creationTimestamp: '2024-01-01T00:00:00Z'",
    ).replace("name: reviews,", "name: zz-old,")
    newer = reviews_vs(
        "- route: [{destination: {host: reviews, subset: v3}}]",
        extra_meta=", creationTimestamp: '2024-06-01T00:00:00Z'",
    ).replace("name: reviews,", "name: aa-new,")
    assert only_route(newer, older).route.cluster == cluster("v2")


# --- matches ------------------------------------------------------------------------------


def test_uri_method_authority_scheme_matches() -> None:
    routes = routes_of(
        bookinfo(
            DR_ALL,
            reviews_vs(
                """
                - match:
                  - uri: {exact: /health}
                    method: {exact: GET}
                  - uri: {prefix: /api}
                    ignoreUriCase: true
                    authority: {prefix: reviews}
                  - uri: {regex: '/v[0-9]+/.*'}
                    scheme: {exact: http}
                  route: [{destination: {host: reviews, subset: v1}}]
                """
            ),
        ),
        REVIEWS,
    )
    exact, prefix, regex = (r.match for r in routes)
    assert exact.path == "/health"
    assert [(h.name, h.string_match.exact) for h in exact.headers] == [(":method", "GET")]
    assert prefix.prefix == "/api"
    assert prefix.case_sensitive.value is False
    assert [(h.name, h.string_match.prefix) for h in prefix.headers] == [(":authority", "reviews")]
    assert regex.safe_regex.regex == "/v[0-9]+/.*"
    assert [(h.name, h.string_match.exact) for h in regex.headers] == [(":scheme", "http")]
    # Istio's decorator shows the matched path.
    assert [r.decorator.operation for r in routes] == [
        f"{REVIEWS}:9080/health",
        f"{REVIEWS}:9080/api*",
        f"{REVIEWS}:9080/v[0-9]+/.*",
    ]


def test_header_and_query_matches_with_presence_and_absence() -> None:
    (route,) = routes_of(
        bookinfo(
            DR_ALL,
            reviews_vs(
                """
                - match:
                  - headers:
                      x-b: {prefix: beta}
                      x-a: {regex: 'a+'}
                      x-present: {}
                    withoutHeaders:
                      x-debug: {exact: '1'}
                      x-gone: {}
                    queryParams:
                      v: {exact: '2'}
                      flag: {}
                      id: {regex: '[0-9]+'}
                  route: [{destination: {host: reviews, subset: v2}}]
                """
            ),
        ),
        REVIEWS,
    )
    headers = {h.name: h for h in route.match.headers}
    assert [h.name for h in route.match.headers] == sorted(headers)
    assert headers["x-a"].string_match.safe_regex.regex == "a+"
    assert headers["x-b"].string_match.prefix == "beta"
    assert headers["x-present"].present_match is True
    assert headers["x-debug"].invert_match and headers["x-debug"].treat_missing_header_as_empty
    assert headers["x-debug"].string_match.exact == "1"
    gone = headers["x-gone"]
    assert gone.invert_match and gone.present_match and not gone.treat_missing_header_as_empty
    query = {q.name: q for q in route.match.query_parameters}
    assert [q.name for q in route.match.query_parameters] == ["flag", "id", "v"]
    assert query["flag"].present_match is True
    assert query["id"].string_match.safe_regex.regex == "[0-9]+"
    assert query["v"].string_match.exact == "2"


PORT_AND_SOURCE = reviews_vs(
    """
    - match:
      - port: 9999
      route: [{destination: {host: reviews, subset: v3}}]
    - match:
      - sourceLabels: {app: productpage}
        headers: {x-canary: {}}
      - sourceNamespace: other
      route: [{destination: {host: reviews, subset: v2}}]
    - match:
      - gateways: [some-gateway]
      route: [{destination: {host: reviews, subset: v3}}]
    - match:
      - gateways: [mesh]
        uri: {prefix: /mesh}
      route: [{destination: {host: reviews, subset: v1}}]
    """
)


def test_port_source_and_gateway_matches_are_decided_per_proxy() -> None:
    push = bookinfo(DR_ALL, PORT_AND_SOURCE)
    routes = routes_of(push, REVIEWS)
    # The port-9999 rule and the gateway-only rule do not exist on this sidecar's 9080.
    assert [(r.route.cluster, r.match.prefix) for r in routes] == [
        (cluster("v2"), "/"),
        (cluster("v1"), "/mesh"),
    ]
    assert routes[0].match.headers[0].name == "x-canary"
    # Another workload: the sourceLabels match drops out; nothing else is left for
    # unmatched requests but the /mesh rule (then 404, as Istio).
    other = productpage(labels={"app": "ratings"}, name="ratings-v1")
    assert [r.route.cluster for r in routes_of(push, REVIEWS, other)] == [cluster("v1")]
    # ...and from namespace other the sourceNamespace match applies, without headers.
    elsewhere = productpage(namespace="other", labels={"app": "x"}, name="x")
    first = routes_of(push, REVIEWS, elsewhere)[0]
    assert first.route.cluster == cluster("v2") and not first.match.headers


def test_rules_for_another_port_only_leave_the_default_route() -> None:
    (route,) = routes_of(
        bookinfo(
            DR_ALL,
            reviews_vs(
                """
                - match: [{port: 9999}]
                  route: [{destination: {host: reviews, subset: v3}}]
                """
            ),
        ),
        REVIEWS,
    )
    assert route.name == "default" and route.route.cluster == cluster("")


def test_tcp_only_virtual_service_leaves_http_default() -> None:
    tcp = vs("reviews", "hosts: [reviews]\ntcp:\n- route: [{destination: {host: reviews}}]")
    (route,) = routes_of(bookinfo(DR_ALL, tcp), REVIEWS)
    assert route.name == "default"


def test_catch_all_match_ends_the_route_list() -> None:
    routes = routes_of(
        bookinfo(
            DR_ALL,
            reviews_vs(
                """
                - match: [{uri: {prefix: /}}, {uri: {prefix: /never}}]
                  route: [{destination: {host: reviews, subset: v1}}]
                - route: [{destination: {host: reviews, subset: v2}}]
                """
            ),
        ),
        REVIEWS,
    )
    assert [r.route.cluster for r in routes] == [cluster("v1")]


# --- actions ------------------------------------------------------------------------------


def test_redirects() -> None:
    routes = routes_of(
        bookinfo(
            DR_ALL,
            reviews_vs(
                """
                - match: [{uri: {exact: /a}}]
                  redirect: {uri: /b, authority: new.example.com}
                - match: [{uri: {exact: /c}}]
                  redirect: {uri: /d, scheme: https, port: 8443, redirectCode: 308}
                - match: [{uri: {exact: /e}}]
                  redirect: {uri: /f, derivePort: FROM_REQUEST_PORT, redirectCode: 302}
                - match: [{uri: {exact: /g}}]
                  redirect: {uri: /h, port: 80}
                - match: [{uri: {exact: /x}}]
                  redirect: {uri: /y, redirectCode: 300}
                """
            ),
        ),
        REVIEWS,
    )
    a, c, e, g = (r.redirect for r in routes)  # code 300: no such Envoy redirect, dropped
    assert (a.path_redirect, a.host_redirect, a.response_code) == (
        "/b",
        "new.example.com",
        rc.RedirectAction.MOVED_PERMANENTLY,
    )
    assert (c.scheme_redirect, c.port_redirect, c.response_code) == (
        "https",
        8443,
        rc.RedirectAction.PERMANENT_REDIRECT,
    )
    assert (e.port_redirect, e.response_code) == (9080, rc.RedirectAction.FOUND)
    assert g.port_redirect == 0  # :80 is implied for http


def test_direct_responses() -> None:
    text, raw = routes_of(
        bookinfo(
            DR_ALL,
            reviews_vs(
                """
                - match: [{uri: {exact: /text}}]
                  directResponse: {status: 418, body: {string: teapot}}
                - directResponse: {status: 200, body: {bytes: aGVsbG8=}}
                """
            ),
        ),
        REVIEWS,
    )
    assert text.direct_response.status == 418
    assert text.direct_response.body.inline_string == "teapot"
    assert raw.direct_response.body.inline_bytes == b"hello"
    rc_ = route_config(bookinfo(DR_ALL))
    assert rc_.max_direct_response_body_size_bytes.value == 1024 * 1024


def test_rewrites() -> None:
    prefix, exact, regex = routes_of(
        bookinfo(
            DR_ALL,
            reviews_vs(
                """
                - match: [{uri: {prefix: /old}}]
                  rewrite: {uri: /new, authority: reviews.internal}
                  route: [{destination: {host: reviews, subset: v1}}]
                - match: [{uri: {exact: /exact}}]
                  rewrite: {uri: /replaced}
                  route: [{destination: {host: reviews, subset: v1}}]
                - rewrite:
                    uriRegexRewrite: {match: '^/service/([^/]+)(/.*)$', rewrite: '\\2/instance/\\1'}
                  route: [{destination: {host: reviews, subset: v1}}]
                """
            ),
        ),
        REVIEWS,
    )
    assert prefix.route.prefix_rewrite == "/new"
    assert prefix.route.host_rewrite_literal == "reviews.internal"
    # Envoy's prefix_rewrite replaces the whole path an exact match consumed (Istio).
    assert exact.route.prefix_rewrite == "/replaced"
    assert regex.route.regex_rewrite.pattern.regex == "^/service/([^/]+)(/.*)$"
    assert regex.route.regex_rewrite.substitution == "\\2/instance/\\1"


def test_timeout_and_retries() -> None:
    timed, retried, off, remote = routes_of(
        bookinfo(
            DR_ALL,
            reviews_vs(
                """
                - match: [{uri: {prefix: /t}}]
                  timeout: 0.5s
                  route: [{destination: {host: reviews, subset: v2}}]
                - match: [{uri: {prefix: /r}}]
                  retries: {attempts: 3, perTryTimeout: 2s, retryOn: '5xx,gateway-error,429'}
                  route: [{destination: {host: reviews, subset: v2}}]
                - match: [{uri: {prefix: /o}}]
                  retries: {attempts: 0}
                  route: [{destination: {host: reviews, subset: v2}}]
                - retries:
                    attempts: 1
                    retryRemoteLocalities: true
                    retryIgnorePreviousHosts: false
                    backoff: 25ms
                  route: [{destination: {host: reviews, subset: v2}}]
                """
            ),
        ),
        REVIEWS,
    )
    assert timed.route.timeout.nanos == 500_000_000
    # max_stream_duration would make Envoy ignore `timeout` ("new timeouts").
    assert not timed.route.HasField("max_stream_duration")
    policy = retried.route.retry_policy
    assert policy.num_retries.value == 3
    assert policy.per_try_timeout.seconds == 2
    assert policy.retry_on == "5xx,gateway-error,retriable-status-codes"
    assert list(policy.retriable_status_codes) == [429]
    assert not off.route.HasField("retry_policy")
    rp = remote.route.retry_policy
    assert rp.retry_priority.name == "envoy.retry_priorities.previous_priorities"
    assert not rp.retry_host_predicate
    assert rp.retry_back_off.base_interval.nanos == 25_000_000
    # retryOn unset: Istio's default conditions and 503 stay.
    assert rp.retry_on.startswith("connect-failure") and list(rp.retriable_status_codes) == [503]


def test_mirrors() -> None:
    route = only_route(
        reviews_vs(
            """
            - mirror: {host: reviews, subset: v3}
              mirrorPercentage: {value: 12.5}
              mirrors:
              - destination: {host: ratings}
              - destination: {host: ratings, subset: v2}
                percentage: {value: 0}
              - destination: {host: unknown}
              route: [{destination: {host: reviews, subset: v1}}]
            """
        )
    )
    mirrors = route.route.request_mirror_policies
    assert [(m.cluster, m.runtime_fraction.default_value.numerator) for m in mirrors] == [
        (cluster("v3"), 125_000),
        (cluster("", RATINGS), 100),
    ]
    assert mirrors[0].runtime_fraction.default_value.denominator == (
        percent_pb2.FractionalPercent.MILLION
    )
    assert mirrors[1].runtime_fraction.default_value.denominator == (
        percent_pb2.FractionalPercent.HUNDRED
    )
    assert all(m.trace_sampled.value is False and m.HasField("trace_sampled") for m in mirrors)


def test_header_operations_on_rule_and_destinations() -> None:
    rule_level, split = routes_of(
        bookinfo(
            DR_ALL,
            reviews_vs(
                """
                - match: [{uri: {prefix: /one}}]
                  headers:
                    request:
                      set: {x-b: '2', x-a: '1', ':authority': reviews.override}
                      add: {x-c: '3'}
                      remove: [x-drop, host]
                    response:
                      set: {x-resp: r}
                      remove: [server]
                  route:
                  - destination: {host: reviews, subset: v1}
                    headers: {request: {add: {x-dest: d}}}
                - route:
                  - destination: {host: reviews, subset: v1}
                    weight: 50
                    headers:
                      request: {set: {x-version: v1, host: v1.reviews}}
                      response: {add: {x-served-by: v1}}
                  - destination: {host: reviews, subset: v2}
                    weight: 50
                """
            ),
        ),
        REVIEWS,
    )
    req = [
        (h.header.key, h.header.value, h.append_action) for h in rule_level.request_headers_to_add
    ]
    assert req == [
        ("x-a", "1", OVERWRITE),
        ("x-b", "2", OVERWRITE),
        ("x-c", "3", APPEND),
        ("x-dest", "d", APPEND),
    ]
    assert list(rule_level.request_headers_to_remove) == ["x-drop"]
    assert [(h.header.key, h.append_action) for h in rule_level.response_headers_to_add] == [
        ("x-resp", OVERWRITE)
    ]
    assert list(rule_level.response_headers_to_remove) == ["server"]
    assert rule_level.route.host_rewrite_literal == "reviews.override"
    v1, v2 = split.route.weighted_clusters.clusters
    assert [(h.header.key, h.append_action) for h in v1.request_headers_to_add] == [
        ("x-version", OVERWRITE)
    ]
    assert v1.host_rewrite_literal == "v1.reviews"
    assert [h.header.key for h in v1.response_headers_to_add] == ["x-served-by"]
    assert not v2.request_headers_to_add


def test_cors_policy() -> None:
    route = only_route(
        reviews_vs(
            """
            - corsPolicy:
                allowOrigins: [{exact: 'https://example.com'}, {regex: 'https://.*\\.example\\.org'}]
                allowMethods: [GET, POST]
                allowHeaders: [x-a, x-b]
                exposeHeaders: [x-c]
                maxAge: 24h
                allowCredentials: true
              route: [{destination: {host: reviews, subset: v1}}]
            """
        )
    )
    cors = unpack(route.typed_per_filter_config[CORS_FILTER], cors_pb2.CorsPolicy)
    assert [m.exact or m.safe_regex.regex for m in cors.allow_origin_string_match] == [
        "https://example.com",
        "https://.*\\.example\\.org",
    ]
    assert cors.allow_methods == "GET,POST"
    assert cors.allow_headers == "x-a,x-b"
    assert cors.expose_headers == "x-c"
    assert cors.max_age == "86400"
    assert cors.allow_credentials.value is True
    assert cors.filter_enabled.default_value.numerator == 100
    assert cors.forward_not_matching_preflights.value is True


def test_grpc_abort_and_integer_percent_delay() -> None:
    route = only_route(
        reviews_vs(
            """
            - fault:
                delay: {fixedDelay: 1s, percent: 30}
                abort: {grpcStatus: UNAVAILABLE, percentage: {value: 0.1}}
              route: [{destination: {host: reviews, subset: v1}}]
            """
        )
    )
    fault = unpack(route.typed_per_filter_config[FAULT_FILTER], fault_pb2.HTTPFault)
    assert fault.delay.percentage == percent_pb2.FractionalPercent(
        numerator=30, denominator=percent_pb2.FractionalPercent.HUNDRED
    )
    assert fault.abort.grpc_status == 14
    assert fault.abort.percentage.numerator == 1000


def test_route_and_match_names_and_stat_prefix() -> None:
    (route,) = routes_of(
        bookinfo(
            DR_ALL,
            reviews_vs(
                """
                - name: primary
                  match: [{name: all, statPrefix: reviews_all, uri: {prefix: /}}]
                  route: [{destination: {host: reviews, subset: v1}}]
                """
            ),
        ),
        REVIEWS,
    )
    assert route.name == "primary.all"
    assert route.stat_prefix == "reviews_all"


def test_destination_port_defaults() -> None:
    # A two-port service: without destination port the listener port is used.
    two_ports = dedent(
        """
        apiVersion: v1
        kind: Service
        metadata: {name: multi, namespace: default}
        spec:
          selector: {app: multi}
          ports: [{name: http, port: 8000}, {name: http-admin, port: 8001}]
        """
    )
    to_multi = vs(
        "to-multi",
        """
        hosts: [reviews]
        http:
        - match: [{uri: {prefix: /admin}}]
          route: [{destination: {host: multi, port: {number: 8001}}}]
        - route: [{destination: {host: multi}}]
        """,
    )
    admin, rest = routes_of(bookinfo(two_ports, to_multi), REVIEWS)
    multi = "multi.default.svc.cluster.local"
    assert admin.route.cluster == f"outbound|8001||{multi}"
    # Listener port 9080 is not a port of multi: that cluster does not exist.
    assert rest.direct_response.status == 503
    assert f"outbound|9080||{multi}" in rest.direct_response.body.inline_string


def test_consistent_hash_from_destination_rule() -> None:
    dr = dedent(
        """
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: ratings, namespace: default}
        spec:
          host: ratings
          trafficPolicy:
            loadBalancer:
              consistentHash: {httpHeaderName: x-user}
          subsets: [{name: v1, labels: {version: v1}}]
        """
    )
    ratings_vs = vs(
        "ratings", "hosts: [ratings]\nhttp:\n- route: [{destination: {host: ratings, subset: v1}}]"
    )
    (routed,) = routes_of(bookinfo(dr, ratings_vs), RATINGS)
    (policy,) = routed.route.hash_policy
    assert policy.header.header_name == "x-user"
    # Retries stay on the hashed host: no previous_hosts predicate (Istio).
    assert not routed.route.retry_policy.retry_host_predicate
    (default,) = routes_of(bookinfo(dr), RATINGS)
    assert default.route.hash_policy[0].header.header_name == "x-user"
    assert not default.route.retry_policy.retry_host_predicate


def test_virtual_service_routes_are_deterministic() -> None:
    docs = (DR_ALL, PORT_AND_SOURCE, networking("virtual-service-ratings-test-delay.yaml"))
    a = build_route_configs(bookinfo(*docs), productpage(), None)
    b = build_route_configs(bookinfo(*docs), productpage(), None)
    assert serialized(a) == serialized(b)


def test_source_labels_key_separates_only_proxies_that_route_differently() -> None:
    plain = bookinfo(DR_ALL, networking("virtual-service-reviews-test-v2.yaml"))
    a = productpage()
    b = productpage(labels={"app": "ratings", "version": "v9"}, name="ratings-v9")
    assert source_labels_key(plain, a) is None
    with_labels = bookinfo(DR_ALL, PORT_AND_SOURCE)
    assert source_labels_key(with_labels, a) == (("app", "productpage"),)
    assert source_labels_key(with_labels, a) != source_labels_key(with_labels, b)
    same_app = productpage(labels={"app": "productpage", "version": "v2"})
    assert source_labels_key(with_labels, same_app) == source_labels_key(with_labels, a)
