"""AuthorizationPolicy: which policies select a workload, and their RBAC translation
(Istio's authz builder: matching conventions, not* fields, when conditions, TCP
semantics, evaluation order)."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from google.protobuf import json_format

from meshpilot.api.parse import parse_text
from meshpilot.model.push_context import PushContext
from meshpilot.translators.authz import (
    HTTP_RBAC_FILTER,
    NETWORK_RBAC_FILTER,
    build_rbac,
    string_matcher,
)
from meshpilot.translators.listeners import build_listeners

from ._helpers import by_name, dedent, hcm_of, push_of, sidecar, unpack

RBAC = rbac_pb2.RBAC
ANY_PRINCIPAL = {"andIds": {"ids": [{"any": True}]}}
ANY_PERMISSION = {"andRules": {"rules": [{"any": True}]}}
POLICY = "ns[default]-policy[p]-rule[0]"


def ap(spec: str, name: str = "p", namespace: str = "default") -> str:
    return (
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n"
        + "\n".join("  " + line for line in dedent(spec).splitlines())
    )


def configs(*docs: str) -> list[Any]:
    result = parse_text("\n---\n".join(docs), "authz.yaml")
    assert not result.errors, [str(e) for e in result.errors]
    return list(result.configs)


def rbac_dict(spec: str, action: int = RBAC.ALLOW, *, for_tcp: bool = False) -> dict[str, Any]:
    return json_format.MessageToDict(build_rbac(configs(ap(spec)), action, for_tcp=for_tcp))


def rule_of(spec: str, *, for_tcp: bool = False, action: int = RBAC.ALLOW) -> dict[str, Any]:
    return rbac_dict(spec, action, for_tcp=for_tcp)["policies"][POLICY]


def sm(value: str, **kw: bool) -> dict[str, Any]:
    return json_format.MessageToDict(string_matcher(value, **kw))  # type: ignore[arg-type]


# --- matching conventions ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("/exact", {"exact": "/exact"}),
        ("/api/*", {"prefix": "/api/"}),
        ("*.html", {"suffix": ".html"}),
        ("*", {"safeRegex": {"regex": ".+"}}),
    ],
)
def test_string_matching_table(value: str, expected: dict[str, Any]) -> None:
    assert sm(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "cluster.local/ns/default/sa/client",
            {"exact": "spiffe://cluster.local/ns/default/sa/client"},
        ),
        ("cluster.local/ns/default/*", {"prefix": "spiffe://cluster.local/ns/default/"}),
        ("*/sa/client", {"safeRegex": {"regex": "spiffe://.*/sa/client"}}),
        ("*", {"safeRegex": {"regex": ".+"}}),
    ],
)
def test_principals_are_spiffe_uri_matchers(value: str, expected: dict[str, Any]) -> None:
    rule = rule_of(f"rules: [{{from: [{{source: {{principals: ['{value}']}}}}]}}]")
    (principal,) = rule["principals"]
    (ids,) = principal["andIds"]["ids"]
    assert ids == {"orIds": {"ids": [{"authenticated": {"principalName": expected}}]}}
    assert rule["permissions"] == [ANY_PERMISSION]


def test_namespaces_match_the_san_by_regex() -> None:
    rule = rule_of("rules: [{from: [{source: {namespaces: [foo, 'team-*']}}]}]")
    ids = rule["principals"][0]["andIds"]["ids"][0]["orIds"]["ids"]
    assert [i["authenticated"]["principalName"]["safeRegex"]["regex"] for i in ids] == [
        ".*/ns/foo/.*",
        ".*/ns/team-.*/.*",
    ]


def test_every_from_field_and_its_not_form() -> None:
    rule = rule_of(
        """
        rules:
        - from:
          - source:
              principals: [cluster.local/ns/a/sa/x]
              notPrincipals: [cluster.local/ns/a/sa/y]
              namespaces: [a]
              notNamespaces: [b]
              ipBlocks: [10.0.0.0/8]
              notIpBlocks: [10.1.2.3]
              remoteIpBlocks: [192.168.0.0/16]
              notRemoteIpBlocks: ['::1']
        """
    )
    ids = rule["principals"][0]["andIds"]["ids"]
    assert ids == [
        {
            "orIds": {
                "ids": [
                    {
                        "authenticated": {
                            "principalName": {"exact": "spiffe://cluster.local/ns/a/sa/x"}
                        }
                    }
                ]
            }
        },
        {
            "notId": {
                "orIds": {
                    "ids": [
                        {
                            "authenticated": {
                                "principalName": {"exact": "spiffe://cluster.local/ns/a/sa/y"}
                            }
                        }
                    ]
                }
            }
        },
        {
            "orIds": {
                "ids": [
                    {"authenticated": {"principalName": {"safeRegex": {"regex": ".*/ns/a/.*"}}}}
                ]
            }
        },
        {
            "notId": {
                "orIds": {
                    "ids": [
                        {"authenticated": {"principalName": {"safeRegex": {"regex": ".*/ns/b/.*"}}}}
                    ]
                }
            }
        },
        {"orIds": {"ids": [{"remoteIp": {"addressPrefix": "192.168.0.0", "prefixLen": 16}}]}},
        {"notId": {"orIds": {"ids": [{"remoteIp": {"addressPrefix": "::1", "prefixLen": 128}}]}}},
        {"orIds": {"ids": [{"directRemoteIp": {"addressPrefix": "10.0.0.0", "prefixLen": 8}}]}},
        {
            "notId": {
                "orIds": {
                    "ids": [{"directRemoteIp": {"addressPrefix": "10.1.2.3", "prefixLen": 32}}]
                }
            }
        },
    ]


def test_every_to_field_and_its_not_form() -> None:
    rule = rule_of(
        """
        rules:
        - to:
          - operation:
              hosts: [Example.COM, '*.example.com']
              notHosts: ['internal.*']
              methods: [GET, HEAD]
              notMethods: ['*']
              paths: [/allowed, '/api/*']
              notPaths: ['*.secret']
              ports: ['8080']
              notPorts: ['9090']
        """
    )
    rules = rule["permissions"][0]["andRules"]["rules"]
    host = {"name": ":authority"}
    assert rules == [
        {"orRules": {"rules": [
            {"header": {**host, "stringMatch": {"exact": "Example.COM", "ignoreCase": True}}},
            {"header": {**host, "stringMatch": {"suffix": ".example.com", "ignoreCase": True}}},
        ]}},
        {"notRule": {"orRules": {"rules": [
            {"header": {**host, "stringMatch": {"prefix": "internal.", "ignoreCase": True}}},
        ]}}},
        {"orRules": {"rules": [
            {"header": {"name": ":method", "stringMatch": {"exact": "GET"}}},
            {"header": {"name": ":method", "stringMatch": {"exact": "HEAD"}}},
        ]}},
        {"notRule": {"orRules": {"rules": [
            {"header": {"name": ":method", "presentMatch": True}},
        ]}}},
        {"orRules": {"rules": [
            {"urlPath": {"path": {"exact": "/allowed"}}},
            {"urlPath": {"path": {"prefix": "/api/"}}},
        ]}},
        {"notRule": {"orRules": {"rules": [{"urlPath": {"path": {"suffix": ".secret"}}}]}}},
        {"orRules": {"rules": [{"destinationPort": 8080}]}},
        {"notRule": {"orRules": {"rules": [{"destinationPort": 9090}]}}},
    ]  # fmt: skip
    assert rule["principals"] == [ANY_PRINCIPAL]


def test_path_templates_use_envoys_uri_template_matcher() -> None:
    rule = rule_of("rules: [{to: [{operation: {paths: ['/api/{*}/items/{**}']}}]}]")
    (perm,) = rule["permissions"][0]["andRules"]["rules"][0]["orRules"]["rules"]
    assert perm["uriTemplate"]["typedConfig"]["pathTemplate"] == "/api/*/items/**"


def test_when_conditions_land_in_principals_or_permissions() -> None:
    rule = rule_of(
        """
        rules:
        - from: [{source: {principals: [cluster.local/ns/a/sa/x]}}, {source: {namespaces: [b]}}]
          to: [{operation: {methods: [GET]}}]
          when:
          - {key: 'request.headers[x-user]', values: ['admin*'], notValues: [admin-bad]}
          - {key: source.ip, values: [10.0.0.1]}
          - {key: destination.port, values: ['8080']}
          - {key: connection.sni, values: ['*.local']}
          - {key: destination.ip, notValues: [10.9.0.0/16]}
          - {key: source.principal, values: ['*']}
          - {key: source.namespace, values: [b]}
        """
    )
    # Two `from` entries: two OR'd principals, each carrying the source `when`s.
    assert len(rule["principals"]) == 2
    for principal in rule["principals"]:
        tail = principal["andIds"]["ids"][1:]
        assert tail[0] == {
            "orIds": {"ids": [{"header": {"name": "x-user", "stringMatch": {"prefix": "admin"}}}]}
        }
        assert tail[1] == {
            "notId": {
                "orIds": {
                    "ids": [{"header": {"name": "x-user", "stringMatch": {"exact": "admin-bad"}}}]
                }
            }
        }
        assert tail[2] == {
            "orIds": {"ids": [{"directRemoteIp": {"addressPrefix": "10.0.0.1", "prefixLen": 32}}]}
        }
        assert tail[3] == {
            "orIds": {"ids": [{"authenticated": {"principalName": {"safeRegex": {"regex": ".+"}}}}]}
        }
    perm = rule["permissions"][0]["andRules"]["rules"]
    assert perm[1:] == [
        {"orRules": {"rules": [{"destinationPort": 8080}]}},
        {"orRules": {"rules": [{"requestedServerName": {"suffix": ".local"}}]}},
        {"notRule": {"orRules": {"rules": [
            {"destinationIp": {"addressPrefix": "10.9.0.0", "prefixLen": 16}},
        ]}}},
    ]  # fmt: skip


# --- rule and policy semantics -------------------------------------------------------------------


def test_allow_policy_without_rules_matches_nothing() -> None:
    out = rbac_dict("action: ALLOW")
    assert out == {
        "policies": {
            POLICY: {
                "permissions": [{"notRule": {"any": True}}],
                "principals": [{"notId": {"any": True}}],
            }
        }
    }


def test_an_empty_rule_matches_everything() -> None:
    assert rule_of("rules: [{}]") == {
        "permissions": [ANY_PERMISSION],
        "principals": [ANY_PRINCIPAL],
    }


def test_http_only_fields_drop_an_allow_rule_on_tcp() -> None:
    out = rbac_dict(
        """
        rules:
        - to: [{operation: {methods: [GET]}}]
        - to: [{operation: {ports: ['9000']}}]
        """,
        for_tcp=True,
    )
    assert sorted(out["policies"]) == ["ns[default]-policy[p]-rule[1]"]


def test_http_only_fields_widen_a_deny_rule_on_tcp() -> None:
    rule = rule_of(
        "rules: [{to: [{operation: {methods: [GET], ports: ['9000']}}]}]",
        for_tcp=True,
        action=RBAC.DENY,
    )
    assert rule["permissions"] == [
        {"andRules": {"rules": [{"orRules": {"rules": [{"destinationPort": 9000}]}}]}}
    ]


def test_bad_values_drop_allow_rules_and_are_skipped_in_deny_rules() -> None:
    spec = "rules: [{from: [{source: {ipBlocks: [not-an-ip, 10.0.0.1]}}]}]"
    assert "policies" not in rbac_dict(spec)  # an ALLOW filter with nothing in it
    deny = rule_of(spec, action=RBAC.DENY)
    ids = deny["principals"][0]["andIds"]["ids"][0]["orIds"]["ids"]
    assert ids == [{"directRemoteIp": {"addressPrefix": "10.0.0.1", "prefixLen": 32}}]


def test_unknown_when_key_skips_the_rule() -> None:
    out = rbac_dict(
        """
        rules:
        - when: [{key: request.bogus, values: [x]}]
        - {}
        """
    )
    assert sorted(out["policies"]) == ["ns[default]-policy[p]-rule[1]"]


def test_request_principals_need_jwt_metadata_nothing_provides() -> None:
    rule = rule_of("rules: [{from: [{source: {requestPrincipals: ['*']}}]}]")
    (ids,) = rule["principals"][0]["andIds"]["ids"]
    (m,) = ids["orIds"]["ids"]
    matcher = m["sourcedMetadata"]["metadataMatcher"]
    assert matcher["filter"] == "istio_authn"
    assert matcher["path"] == [{"key": "request.auth.principal"}]


def test_service_accounts_match_the_san_by_regex() -> None:
    rule = rule_of("rules: [{from: [{source: {serviceAccounts: [client, other/bot]}}]}]")
    ids = rule["principals"][0]["andIds"]["ids"][0]["orIds"]["ids"]
    assert [i["authenticated"]["principalName"]["safeRegex"]["regex"] for i in ids] == [
        "spiffe://.+/ns/default/(.+/|)sa/client(/.+)?",
        "spiffe://.+/ns/other/(.+/|)sa/bot(/.+)?",
    ]


# --- selection and filters in the listeners ------------------------------------------------------


def select(push: PushContext, namespace: str = "default", **labels: str) -> list[str]:
    found = push.security.authorization_policies(namespace, labels or {"app": "reviews"})
    return [
        f"{c.spec.action}:{c.namespace}/{c.name}"
        for c in (*found.custom, *found.audit, *found.deny, *found.allow)
    ]


def test_selection_root_namespace_workload_namespace_and_selectors() -> None:
    push = push_of(
        ap("rules: [{}]", "mesh-wide", "istio-system"),
        ap(
            "{selector: {matchLabels: {app: reviews}}, action: DENY, rules: [{}]}",
            "root-sel",
            "istio-system",
        ),
        ap("rules: [{}]", "ns-wide"),
        ap("{selector: {matchLabels: {app: reviews}}, action: AUDIT, rules: [{}]}", "reviews"),
        ap("{selector: {matchLabels: {app: ratings}}, rules: [{}]}", "ratings"),
        ap("rules: [{}]", "elsewhere", "other"),
        ap("{targetRefs: [{kind: Gateway, name: gw}], rules: [{}]}", "gateway-only"),
    )
    assert select(push) == [
        "AUDIT:default/reviews",
        "DENY:istio-system/root-sel",
        "ALLOW:istio-system/mesh-wide",
        "ALLOW:default/ns-wide",
    ]
    # Root namespace policies with a selector apply in every namespace (Istio).
    assert select(push, "other") == [
        "DENY:istio-system/root-sel",
        "ALLOW:istio-system/mesh-wide",
        "ALLOW:other/elsewhere",
    ]
    assert select(push, app="ratings") == [
        "ALLOW:istio-system/mesh-wide",
        "ALLOW:default/ns-wide",
        "ALLOW:default/ratings",
    ]


def http_rbac(lst: listener_pb2.Listener, chain: str) -> list[http_rbac_pb2.RBAC]:
    c = next(c for c in lst.filter_chains if c.name == chain)
    filters = hcm_of(c).http_filters
    out = [
        unpack(f.typed_config, http_rbac_pb2.RBAC) for f in filters if f.name == HTTP_RBAC_FILTER
    ]
    # RBAC filters come first, before fault injection and the router.
    assert [f.name for f in filters][len(out) :] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.cors",
        "envoy.filters.http.router",
    ]
    return out


def network_rbac(lst: listener_pb2.Listener, chain: str) -> list[network_rbac_pb2.RBAC]:
    c = next(c for c in lst.filter_chains if c.name == chain)
    assert c.filters[-1].name == "envoy.filters.network.tcp_proxy"
    return [
        unpack(f.typed_config, network_rbac_pb2.RBAC)
        for f in c.filters
        if f.name == NETWORK_RBAC_FILTER
    ]


ALL_ACTIONS = (
    ap("{action: ALLOW, rules: [{to: [{operation: {paths: [/allowed]}}]}]}", "allow"),
    ap("{action: DENY, rules: [{to: [{operation: {methods: [DELETE]}}]}]}", "deny"),
    ap("{action: AUDIT, rules: [{}]}", "audit"),
    ap(
        "{action: CUSTOM, provider: {name: opa},"
        " rules: [{to: [{operation: {paths: ['/ext/*']}}]}]}",
        "ext",
    ),
)


def test_http_filters_in_istios_order_custom_audit_deny_allow() -> None:
    vi = by_name(build_listeners(push_of(*ALL_ACTIONS), sidecar(sds=True)))["virtualInbound"]
    for chain in [c for c in vi.filter_chains if c.name == "0.0.0.0_8080"]:
        custom, audit, deny, allow = http_rbac(vi, chain.name)
        # No ext_authz provider: what CUSTOM would send to it is denied (fail closed).
        assert custom.rules.action == RBAC.DENY
        assert list(custom.rules.policies) == [
            "istio-ext-authz-ns[default]-policy[ext]-rule[0]-deny-due-to-bad-CUSTOM-action"
        ]
        assert audit.rules.action == RBAC.LOG
        assert deny.rules.action == RBAC.DENY
        assert allow.rules.action == RBAC.ALLOW
        assert list(allow.rules.policies) == ["ns[default]-policy[allow]-rule[0]"]


def test_tcp_chains_get_network_rbac_with_tcp_semantics() -> None:
    push = push_of(
        *ALL_ACTIONS,
        dedent(
            """
            apiVersion: networking.istio.io/v1
            kind: WorkloadEntry
            metadata: {name: echo, namespace: default}
            spec: {address: 10.0.0.1, labels: {app: tcp-echo}}
            """
        ),
    )
    vi = by_name(build_listeners(push, sidecar(sds=True)))["virtualInbound"]
    for name in ("0.0.0.0_9000", "virtualInbound"):
        custom, _, deny, allow = network_rbac(vi, name)
        assert custom.stat_prefix == "tcp."
        # HTTP-only DENY and CUSTOM rules deny every connection; the HTTP-only ALLOW rule
        # is dropped, so nothing is allowed.
        assert json_format.MessageToDict(deny.rules)["policies"][
            "ns[default]-policy[deny]-rule[0]"
        ]["permissions"] == [ANY_PERMISSION]
        assert allow.rules.action == RBAC.ALLOW and not allow.rules.policies


def test_no_policies_no_rbac_filters() -> None:
    vi = by_name(build_listeners(push_of(), sidecar(sds=True)))["virtualInbound"]
    assert not http_rbac(vi, "0.0.0.0_8080")
    assert not network_rbac(vi, "virtualInbound")


def test_dry_run_policies_are_shadow_rules_only() -> None:
    dry = ap("{action: DENY, rules: [{to: [{operation: {paths: [/x]}}]}]}", "dry").replace(
        "namespace: default}", "namespace: default, annotations: {istio.io/dry-run: 'true'}}"
    )
    push = push_of(dry, ap("{action: DENY, rules: [{to: [{operation: {paths: [/y]}}]}]}", "real"))
    vi = by_name(build_listeners(push, sidecar(sds=True)))["virtualInbound"]
    (deny,) = http_rbac(vi, "0.0.0.0_8080")
    assert list(deny.rules.policies) == ["ns[default]-policy[real]-rule[0]"]
    assert list(deny.shadow_rules.policies) == ["ns[default]-policy[dry]-rule[0]"]
    assert deny.shadow_rules_stat_prefix == "istio_dry_run_deny_"
    # Only dry-run ALLOW policies: nothing is enforced.
    only_dry = push_of(dry.replace("action: DENY", "action: ALLOW"))
    vi = by_name(build_listeners(only_dry, sidecar(sds=True)))["virtualInbound"]
    (allow,) = http_rbac(vi, "0.0.0.0_8080")
    assert not allow.HasField("rules") and allow.shadow_rules.action == RBAC.ALLOW
