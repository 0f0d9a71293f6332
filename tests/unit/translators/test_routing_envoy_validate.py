"""Real Envoy (`--mode validate`) accepts every VirtualService feature as translated."""

from __future__ import annotations

import pytest

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.translators.clusters import build_clusters
from meshpilot.translators.listeners import build_listeners
from meshpilot.translators.routes import build_route_configs

from ._helpers import dedent, envoy_validate, inline_routes, push_of
from ._samples import bookinfo_base, networking, productpage, sample, tcp_echo_base
from .test_tcp_tls_routes import TCP_POLICY, TLS_SERVICES, TLS_VS, mesh_version

EVERYTHING = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: matches
    match:
    - name: exact
      uri: {exact: /health}
      method: {exact: GET}
      headers: {x-a: {regex: 'a+'}, x-present: {}}
      withoutHeaders: {x-debug: {exact: '1'}, x-gone: {}}
      queryParams: {v: {exact: '2'}, flag: {}, id: {regex: '[0-9]+'}}
      statPrefix: health
    - uri: {prefix: /api}
      ignoreUriCase: true
      authority: {prefix: reviews}
      scheme: {exact: http}
    - uri: {regex: '/v[0-9]+/.*'}
      sourceLabels: {app: productpage}
    headers:
      request:
        set: {x-b: '2', ':authority': reviews.override}
        add: {x-c: '3'}
        remove: [x-drop]
      response:
        set: {x-resp: r}
        remove: [server]
    timeout: 0.5s
    retries: {attempts: 3, perTryTimeout: 2s, retryOn: '5xx,gateway-error,429'}
    fault:
      delay: {fixedDelay: 1s, percentage: {value: 0.1}}
      abort: {grpcStatus: UNAVAILABLE, percentage: {value: 10}}
    mirror: {host: reviews, subset: v3}
    mirrorPercentage: {value: 12.5}
    mirrors: [{destination: {host: ratings}}]
    corsPolicy:
      allowOrigins: [{exact: 'https://example.com'}, {regex: 'https://.*\\.example\\.org'}]
      allowMethods: [GET, POST]
      allowHeaders: [x-a]
      exposeHeaders: [x-c]
      maxAge: 24h
      allowCredentials: true
    route:
    - destination: {host: reviews, subset: v1}
      weight: 70
      headers:
        request: {set: {x-version: v1, host: v1.reviews}}
        response: {add: {x-served-by: v1}}
    - destination: {host: reviews, subset: v2}
      weight: 30
  - match: [{uri: {prefix: /old}}]
    rewrite: {uri: /new, authority: reviews.internal}
    route: [{destination: {host: reviews, subset: v1}, headers: {request: {add: {x-d: d}}}}]
  - match: [{uri: {prefix: /re}}]
    rewrite:
      uriRegexRewrite: {match: '^/re/([^/]+)(/.*)$', rewrite: '\\2/instance/\\1'}
    retries: {attempts: 1, retryRemoteLocalities: true, backoff: 25ms}
    route: [{destination: {host: reviews, subset: v2}}]
  - match: [{uri: {exact: /a}}]
    redirect: {uri: /b, authority: new.example.com, scheme: https, port: 8443, redirectCode: 308}
  - match: [{uri: {exact: /c}}]
    redirect: {uri: /d, derivePort: FROM_REQUEST_PORT, redirectCode: 302}
  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: teapot}}
  - match: [{uri: {exact: /bytes}}]
    directResponse: {status: 200, body: {bytes: aGVsbG8=}}
  - match: [{uri: {prefix: /missing}}]
    route: [{destination: {host: reviews, subset: v9}}]
  - match: [{uri: {prefix: /zero}}]
    route:
    - destination: {host: reviews, subset: v1}
    - destination: {host: reviews, subset: v2}
  - retries: {attempts: 0}
    route: [{destination: {host: reviews, subset: v3}}]
"""

HASHED = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: productpage, namespace: default}
spec:
  host: productpage
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: session, ttl: 60s}}
  subsets: [{name: v1, labels: {version: v1}}]
"""

EXPLICIT = """
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {name: explicit, namespace: default}
spec:
  egress:
  - port: {number: 9080, protocol: HTTP, name: http}
    bind: 127.0.0.2
    captureMode: NONE
    hosts: ["./*"]
  - port: {number: 9000, protocol: TCP, name: tcp}
    bind: 127.0.0.2
    captureMode: NONE
    hosts: ["./*"]
  - port: {number: 443, protocol: TLS, name: tls}
    bind: 127.0.0.2
    captureMode: NONE
    hosts: ["./*"]
"""


def _push(*extra: str) -> PushContext:
    base = "\n---\n".join([bookinfo_base(), tcp_echo_base(), dedent(TLS_SERVICES)])
    # destination-rule-all.yaml, with productpage's rule replaced by a hashing one.
    rules = [
        d
        for d in networking("destination-rule-all.yaml").split("\n---\n")
        if "name: productpage" not in d
    ]
    return push_of(
        "\n---\n".join(rules),
        HASHED,
        EVERYTHING,
        networking("virtual-service-ratings-test-delay.yaml"),
        mesh_version(sample("tcp-echo/tcp-echo-20-v2.yaml")),
        TCP_POLICY,
        TLS_VS,
        *extra,
        base=base,
    )


@pytest.mark.parametrize("mode", ["capture", "explicit"])
def test_envoy_accepts_virtual_service_routes_and_listeners(mode: str) -> None:
    push = _push(EXPLICIT) if mode == "explicit" else _push()
    proxy: Proxy = productpage()
    routes = {rc.name: rc for rc in build_route_configs(push, proxy, None)}
    # Every feature made it into the configuration Envoy is about to check.
    http = routes["9080"]
    reviews = next(v for v in http.virtual_hosts if v.name.startswith("reviews."))
    assert len(reviews.routes) >= 12
    kinds = {r.WhichOneof("action") for r in reviews.routes}
    assert kinds == {"route", "redirect", "direct_response"}
    listeners = build_listeners(push, proxy)
    names = {lst.name for lst in listeners}
    assert ("127.0.0.2_9000" if mode == "explicit" else "0.0.0.0_9000") in names
    envoy_validate(
        clusters=build_clusters(push, proxy),
        listeners=inline_routes(listeners, routes),
        node_id=proxy.id,
    )
