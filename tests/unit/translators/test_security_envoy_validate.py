"""The security translation passes the real Envoy's `--mode validate`: ISTIO_MUTUAL and
auto-mTLS clusters, STRICT and PERMISSIVE inbound chains, HTTP and network RBAC
filters, and Sidecar ingress TLS with real certificate files."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.translators.clusters import build_clusters
from meshpilot.translators.listeners import build_listeners
from meshpilot.translators.routes import build_route_configs

from ._helpers import envoy_validate, inline_routes, push_of, sidecar
from ._samples import bookinfo, networking, productpage
from .test_destination_rules import _write_pki

WORKLOADS = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo, namespace: default}
spec: {address: 10.0.0.1, labels: {app: tcp-echo}, serviceAccount: echo}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: greeter, namespace: default}
spec: {address: 10.0.1.1, labels: {app: greeter, security.istio.io/tlsMode: istio}}
"""

POLICIES = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: default}
spec:
  rules:
  - from:
    - source:
        principals: [cluster.local/ns/default/sa/client, '*/sa/bot']
        notNamespaces: [blocked]
        ipBlocks: [10.0.0.0/8]
        notRemoteIpBlocks: ['2001:db8::/32']
        requestPrincipals: ['issuer/*']
        serviceAccounts: [client]
    to:
    - operation:
        hosts: ['*.example.com', Reviews]
        methods: [GET, '*']
        notPaths: ['/admin/*', '*.secret', '/api/{*}/x/{**}']
        ports: ['8080']
    when:
    - {key: 'request.headers[x-user]', values: ['*'], notValues: [root]}
    - {key: source.namespace, values: [default]}
    - {key: destination.ip, values: [10.0.0.1]}
    - {key: connection.sni, values: ['outbound_*']}
    - {key: 'request.auth.claims[groups]', values: [admins]}
    - {key: request.auth.audiences, values: [aud]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: [DELETE]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: default}
spec: {action: AUDIT, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: default}
spec: {action: CUSTOM, provider: {name: opa}, rules: [{to: [{operation: {paths: ['/ext']}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: none, namespace: default}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: dry, namespace: default, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY, rules: [{from: [{source: {notPrincipals: ['*']}}]}]}
"""


def mode(name: str, ports: str = "") -> str:
    return f"""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: wl, namespace: default}}
spec:
  selector: {{matchLabels: {{app: reviews}}}}
  mtls: {{mode: {name}}}
{ports}
"""


CASES = {
    "permissive": (WORKLOADS,),
    "strict": (WORKLOADS, mode("STRICT")),
    "disable": (WORKLOADS, mode("DISABLE")),
    "port-level": (
        WORKLOADS,
        mode("STRICT", "  portLevelMtls:\n    8080: {mode: DISABLE}\n    7000: {mode: PERMISSIVE}"),
    ),
    "rbac-permissive": (WORKLOADS, POLICIES),
    "rbac-strict": (WORKLOADS, POLICIES, mode("STRICT")),
}


def validate(push: PushContext, proxy: Proxy) -> None:
    routes = {rc.name: rc for rc in build_route_configs(push, proxy, None)}
    listeners = inline_routes(build_listeners(push, proxy), routes)
    envoy_validate(clusters=build_clusters(push, proxy), listeners=listeners, node_id=proxy.id)


@pytest.mark.parametrize("case", sorted(CASES))
def test_envoy_accepts_security_config(case: str) -> None:
    validate(push_of(*CASES[case]), sidecar(sds=True))


def test_envoy_accepts_istio_mutual_sample_clusters() -> None:
    validate(bookinfo(networking("destination-rule-all-mtls.yaml")), productpage(sds=True))


def test_envoy_accepts_sidecar_ingress_tls_with_real_files(tmp_path: Path) -> None:
    pki = _write_pki(tmp_path)
    sc = f"""
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: ingress, namespace: default}}
spec:
  workloadSelector: {{labels: {{app: reviews}}}}
  ingress:
  - port: {{number: 9443, protocol: HTTPS, name: https}}
    captureMode: NONE
    defaultEndpoint: 127.0.0.1:8443
    tls:
      mode: MUTUAL
      serverCertificate: {pki["cert"]}
      privateKey: {pki["key"]}
      caCertificates: {pki["ca"]}
      minProtocolVersion: TLSV1_3
  - port: {{number: 9444, protocol: HTTP, name: http}}
    defaultEndpoint: 127.0.0.1:8444
    tls: {{mode: SIMPLE, serverCertificate: {pki["cert"]}, privateKey: {pki["key"]}}}
"""
    for sds in (True, False):
        validate(push_of(WORKLOADS, POLICIES, sc), sidecar(sds=sds))
