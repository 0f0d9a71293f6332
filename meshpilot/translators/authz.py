"""AuthorizationPolicy -> Envoy RBAC filters, as Istio's authz builder and model.

Evaluation order (one RBAC filter per action, in this order): CUSTOM, AUDIT (LOG, never
denies), DENY, ALLOW. No ALLOW policy: everything the DENY filter lets through is
allowed. Some ALLOW policy: a request must match one of their rules. A policy without
rules matches nothing (so an ALLOW policy without rules denies everything); a rule
without from/to/when (`rules: [{}]`) matches everything.

One rule becomes one RBAC policy `ns[NS]-policy[NAME]-rule[I]`: its `from` entries are
OR'd principals, its `to` entries OR'd permissions, and `when` conditions are ANDed
into every principal (source/request keys) or permission (destination/connection keys).
Inside an entry, every field is AND'd; a field's values are OR'd; `not*` values are a
NOT of their OR. Values: `*` any non-empty value (presence), `abc*` prefix, `*abc`
suffix, otherwise exact; hosts ignore case.

HTTP-only fields (hosts, methods, paths, request headers, request principals and
claims) on a TCP filter chain, and values that cannot be translated (a bad CIDR or
port): an ALLOW rule using them is dropped (it can never grant more), a DENY or AUDIT
rule ignores them (it denies more, never less). Istio's checkError.

CUSTOM needs an ext_authz provider from MeshConfig `extensionProviders`; meshpilot has
none, so, as Istio does for a provider it cannot find, CUSTOM rules become DENY rules
(fail closed) and analysis says so.

Principals are checked against the peer certificate's URI SAN: `from.principals`,
`namespaces` and `serviceAccounts` need mutual TLS, which PeerAuthentication decides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeAlias

from envoy.config.core.v3 import address_pb2, extension_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.path.match.uri_template.v3 import uri_template_match_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, regex_pb2, string_pb2

from meshpilot.api.security import AuthorizationPolicySpec, Rule
from meshpilot.config import Config
from meshpilot.model.authz_rules import (
    ATTR_CONN_SNI,
    ATTR_DEST_IP,
    ATTR_DEST_PORT,
    ATTR_REMOTE_IP,
    ATTR_REQUEST_AUDIENCES,
    ATTR_REQUEST_CLAIMS,
    ATTR_REQUEST_HEADER,
    ATTR_REQUEST_PRESENTER,
    ATTR_REQUEST_PRINCIPAL,
    ATTR_SRC_IP,
    ATTR_SRC_NAMESPACE,
    ATTR_SRC_PRINCIPAL,
    InvalidRule,
    Untranslatable,
    check_rule,
    is_port,
    names_in_brackets,
)
from meshpilot.model.proxy import Proxy
from meshpilot.model.push_context import PushContext
from meshpilot.model.security import AuthzPolicies
from meshpilot.translators.common import cidr_range, pack

RBAC: TypeAlias = rbac_pb2.RBAC
Permission: TypeAlias = rbac_pb2.Permission
Principal: TypeAlias = rbac_pb2.Principal
StringMatcher: TypeAlias = string_pb2.StringMatcher

HTTP_RBAC_FILTER = "envoy.filters.http.rbac"
NETWORK_RBAC_FILTER = "envoy.filters.network.rbac"
TCP_STAT_PREFIX = "tcp."
SPIFFE_PREFIX = "spiffe://"
EXT_AUTHZ_PREFIX = "istio-ext-authz"
BAD_CUSTOM_SUFFIX = "-deny-due-to-bad-CUSTOM-action"
# Where Istio's authn filter puts request (JWT) attributes; nothing in meshpilot
# fills it, so rules on them never match (RequestAuthentication is unsupported).
AUTHN_FILTER = "istio_authn"
URI_TEMPLATE_EXTENSION = "uri-template"
DRY_RUN_ANNOTATION = "istio.io/dry-run"
_SHADOW_STAT_PREFIX = {RBAC.ALLOW: "istio_dry_run_allow_", RBAC.DENY: "istio_dry_run_deny_"}

# --- string matching ----------------------------------------------------------------------


def string_matcher(value: str, prefix: str = "", *, ignore_case: bool = False) -> StringMatcher:
    """Istio's StringMatcherWithPrefix: `*` any non-empty value, `x*` prefix, `*x`
    suffix, else exact; `prefix` is prepended to what the value names."""
    if value == "*":
        return StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=".+"), ignore_case=ignore_case)
    if value.startswith("*"):
        if not prefix:
            return StringMatcher(suffix=value[1:], ignore_case=ignore_case)
        return StringMatcher(
            safe_regex=regex_pb2.RegexMatcher(regex=_quote(prefix) + ".*" + _quote(value[1:]))
        )
    if value.endswith("*"):
        return StringMatcher(prefix=prefix + value[:-1], ignore_case=ignore_case)
    return StringMatcher(exact=prefix + value, ignore_case=ignore_case)


def _quote(text: str) -> str:
    """A regex literal, escaping what Go's regexp.QuoteMeta escapes (valid RE2)."""
    return "".join("\\" + ch if ch in _REGEX_META else ch for ch in text)


_REGEX_META = frozenset("\\.+*?()|[]{}^$")


def header_matcher(
    name: str, value: str, *, ignore_case: bool = False
) -> route_components_pb2.HeaderMatcher:
    """Istio's HeaderMatcher/HostMatcher: `*` means the header is present."""
    if value == "*":
        return route_components_pb2.HeaderMatcher(name=name, present_match=True)
    return route_components_pb2.HeaderMatcher(
        name=name, string_match=string_matcher(value, ignore_case=ignore_case)
    )


# --- generators: one value of one key -> a permission or a principal ---------------------


def _cidr(value: str) -> address_pb2.CidrRange:
    rng = cidr_range(value)
    if rng is None:
        raise Untranslatable(f"{value!r} is not an IP address or CIDR")
    return rng


def _port(value: str) -> int:
    if not is_port(value):
        raise Untranslatable(f"{value!r} is not a port")
    return int(value)


def _http_only(key: str, for_tcp: bool) -> None:
    if for_tcp:
        raise Untranslatable(f"{key!r} is HTTP only")


def _host(key: str, value: str, for_tcp: bool) -> Permission:
    _http_only(key, for_tcp)
    return Permission(header=header_matcher(":authority", value, ignore_case=True))


def _method(key: str, value: str, for_tcp: bool) -> Permission:
    _http_only(key, for_tcp)
    return Permission(header=header_matcher(":method", value))


def _path(key: str, value: str, for_tcp: bool) -> Permission:
    _http_only(key, for_tcp)
    if "{*}" in value or "{**}" in value:
        template = uri_template_match_pb2.UriTemplateMatchConfig(
            path_template=value.replace("{**}", "**").replace("{*}", "*")
        )
        return Permission(
            uri_template=extension_pb2.TypedExtensionConfig(
                name=URI_TEMPLATE_EXTENSION, typed_config=pack(template)
            )
        )
    return Permission(url_path=path_pb2.PathMatcher(path=string_matcher(value)))


def _dest_port(key: str, value: str, for_tcp: bool) -> Permission:
    return Permission(destination_port=_port(value))


def _dest_ip(key: str, value: str, for_tcp: bool) -> Permission:
    return Permission(destination_ip=_cidr(value))


def _sni(key: str, value: str, for_tcp: bool) -> Permission:
    return Permission(requested_server_name=string_matcher(value))


def _src_ip(key: str, value: str, for_tcp: bool) -> Principal:
    return Principal(direct_remote_ip=_cidr(value))


def _remote_ip(key: str, value: str, for_tcp: bool) -> Principal:
    return Principal(remote_ip=_cidr(value))


def _authenticated(m: StringMatcher) -> Principal:
    return Principal(authenticated=Principal.Authenticated(principal_name=m))


def _src_principal(key: str, value: str, for_tcp: bool) -> Principal:
    return _authenticated(string_matcher(value, SPIFFE_PREFIX))


def _src_namespace(key: str, value: str, for_tcp: bool) -> Principal:
    ns = value.replace("*", ".*")
    return _authenticated(StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=f".*/ns/{ns}/.*")))


def _service_account_for(namespace: str) -> Callable[[str, str, bool], Principal]:
    """`from.source.serviceAccounts`: `SA` (in the policy's namespace) or `NS/SA`."""

    def gen(key: str, value: str, for_tcp: bool) -> Principal:
        ns, sep, sa = value.partition("/")
        if not sep:
            ns, sa = namespace, value
        regex = f"spiffe://.+/ns/{ns}/(.+/|)sa/{sa}(/.+)?"
        return _authenticated(StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex)))

    return gen


def _metadata(path: Sequence[str], value: str, *, is_list: bool = False) -> Principal:
    m = metadata_pb2.MetadataMatcher(filter=AUTHN_FILTER)
    for segment in path:
        m.path.add(key=segment)
    if is_list:
        m.value.list_match.one_of.string_match.CopyFrom(string_matcher(value))
    else:
        m.value.string_match.CopyFrom(string_matcher(value))
    # `sourced_metadata` (dynamic metadata): Envoy deprecates the plain `metadata` field.
    return Principal(sourced_metadata=rbac_pb2.SourcedMetadata(metadata_matcher=m))


def _request_attr(attr: str) -> Callable[[str, str, bool], Principal]:
    def gen(key: str, value: str, for_tcp: bool) -> Principal:
        _http_only(key, for_tcp)
        return _metadata([attr], value, is_list=attr == ATTR_REQUEST_AUDIENCES)

    return gen


def _request_claim(key: str, value: str, for_tcp: bool) -> Principal:
    _http_only(key, for_tcp)
    claims = names_in_brackets(key.removeprefix(ATTR_REQUEST_CLAIMS))
    return _metadata([ATTR_REQUEST_CLAIMS, *claims], value, is_list=True)


def _request_header(key: str, value: str, for_tcp: bool) -> Principal:
    _http_only(key, for_tcp)
    (name,) = names_in_brackets(key.removeprefix(ATTR_REQUEST_HEADER), nested=False)
    return Principal(header=header_matcher(name, value))


Generator = Callable[[str, str, bool], "Permission | Principal"]


@dataclass(frozen=True, slots=True)
class _Cond:
    key: str
    values: tuple[str, ...]
    not_values: tuple[str, ...]
    gen: Generator


def when_target(key: str) -> tuple[str, Generator] | None:
    """("permission" | "principal", generator) for a `when` key; None if unknown."""
    if key == ATTR_DEST_IP:
        return "permission", _dest_ip
    if key == ATTR_DEST_PORT:
        return "permission", _dest_port
    if key == ATTR_CONN_SNI:
        return "permission", _sni
    if key == ATTR_SRC_IP:
        return "principal", _src_ip
    if key == ATTR_REMOTE_IP:
        return "principal", _remote_ip
    if key == ATTR_SRC_NAMESPACE:
        return "principal", _src_namespace
    if key == ATTR_SRC_PRINCIPAL:
        return "principal", _src_principal
    if key in (ATTR_REQUEST_PRINCIPAL, ATTR_REQUEST_AUDIENCES, ATTR_REQUEST_PRESENTER):
        return "principal", _request_attr(key)
    if key.startswith(ATTR_REQUEST_HEADER + "["):
        return "principal", _request_header
    if key.startswith(ATTR_REQUEST_CLAIMS + "["):
        return "principal", _request_claim
    return None


# --- the model of one rule ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleModel:
    """A rule as OR'd principal and permission lists, each an AND of conditions."""

    permissions: tuple[tuple[_Cond, ...], ...]
    principals: tuple[tuple[_Cond, ...], ...]


def _cond(
    key: str, values: Sequence[str], not_values: Sequence[str], gen: Generator
) -> list[_Cond]:
    if not values and not not_values:
        return []
    return [_Cond(key, tuple(values), tuple(not_values), gen)]


def rule_model(rule: Rule, policy_namespace: str) -> RuleModel:
    """Istio's model.New; raises InvalidRule for what Istio would skip."""
    base_perm: list[_Cond] = []
    base_princ: list[_Cond] = []
    check_rule(rule)
    for cond in rule.when:
        target = when_target(cond.key)
        assert target is not None  # check_rule rejected unknown keys
        kind, gen = target
        (base_perm if kind == "permission" else base_princ).extend(
            _cond(cond.key, cond.values, cond.not_values, gen)
        )
    principals = []
    for f in rule.from_:
        s = f.source
        principals.append(
            (
                *_cond("principals", s.principals, s.not_principals, _src_principal),
                *_cond(
                    "serviceAccounts",
                    s.service_accounts,
                    s.not_service_accounts,
                    _service_account_for(policy_namespace),
                ),
                *_cond(
                    "requestPrincipals",
                    s.request_principals,
                    s.not_request_principals,
                    _request_attr(ATTR_REQUEST_PRINCIPAL),
                ),
                *_cond("namespaces", s.namespaces, s.not_namespaces, _src_namespace),
                *_cond("remoteIpBlocks", s.remote_ip_blocks, s.not_remote_ip_blocks, _remote_ip),
                *_cond("ipBlocks", s.ip_blocks, s.not_ip_blocks, _src_ip),
                *base_princ,
            )
        )
    if not rule.from_:
        principals.append(tuple(base_princ))
    permissions = []
    for t in rule.to:
        o = t.operation
        permissions.append(
            (
                *_cond("hosts", o.hosts, o.not_hosts, _host),
                *_cond("methods", o.methods, o.not_methods, _method),
                *_cond("paths", o.paths, o.not_paths, _path),
                *_cond("ports", o.ports, o.not_ports, _dest_port),
                *base_perm,
            )
        )
    if not rule.to:
        permissions.append(tuple(base_perm))
    return RuleModel(tuple(permissions), tuple(principals))


def _translate(
    cond: _Cond, value: str, for_tcp: bool, strict: bool
) -> Permission | Principal | None:
    try:
        return cond.gen(cond.key, value, for_tcp)
    except Untranslatable:
        if strict:
            raise
        return None


def _conditions(
    conds: Sequence[_Cond], for_tcp: bool, strict: bool, cls: type[Permission] | type[Principal]
) -> Iterator[Permission | Principal]:
    is_perm = cls is Permission
    for cond in conds:
        for values, negate in ((cond.values, False), (cond.not_values, True)):
            got = [p for v in values if (p := _translate(cond, v, for_tcp, strict)) is not None]
            if not got:
                continue
            if is_perm:
                either: Permission | Principal = Permission(or_rules=Permission.Set(rules=got))
                yield Permission(not_rule=either) if negate else either
            else:
                either = Principal(or_ids=Principal.Set(ids=got))
                yield Principal(not_id=either) if negate else either


def generate_policy(model: RuleModel, *, for_tcp: bool, strict: bool) -> rbac_pb2.Policy:
    """Istio's Model.Generate. `strict` (ALLOW): an untranslatable value raises
    Untranslatable and the caller drops the rule; otherwise the value is skipped."""
    policy = rbac_pb2.Policy()
    for conds in model.permissions:
        parts = list(_conditions(conds, for_tcp, strict, Permission)) or [Permission(any=True)]
        policy.permissions.add().and_rules.rules.extend(parts)
    for conds in model.principals:
        parts = list(_conditions(conds, for_tcp, strict, Principal)) or [Principal(any=True)]
        policy.principals.add().and_ids.ids.extend(parts)
    return policy


def _match_never() -> rbac_pb2.Policy:
    return rbac_pb2.Policy(
        permissions=[Permission(not_rule=Permission(any=True))],
        principals=[Principal(not_id=Principal(any=True))],
    )


def policy_name(cfg: Config, index: int, *, custom: bool = False) -> str:
    prefix = f"{EXT_AUTHZ_PREFIX}-" if custom else ""
    return f"{prefix}ns[{cfg.namespace}]-policy[{cfg.name}]-rule[{index}]"


def build_rbac(
    policies: Sequence[Config], action: int, *, for_tcp: bool, custom: bool = False
) -> RBAC:
    """One RBAC rule set from the policies of one action (Istio's Builder.build)."""
    out = RBAC(action=action)
    strict = action == RBAC.ALLOW
    for cfg in policies:
        spec: AuthorizationPolicySpec = cfg.spec
        for i, rule in enumerate(spec.rules):
            name = policy_name(cfg, i, custom=custom)
            try:
                model = rule_model(rule, cfg.namespace)
                generated = generate_policy(model, for_tcp=for_tcp, strict=strict)
            except (InvalidRule, Untranslatable):
                continue  # skipped rule: analysis reports invalid ones
            out.policies[name].CopyFrom(generated)
        if not spec.rules:
            out.policies[policy_name(cfg, 0, custom=custom)].CopyFrom(_match_never())
    if custom:
        # No ext_authz provider can be found: deny what the policy would send to it.
        denied = RBAC(action=RBAC.DENY)
        for name in sorted(out.policies):
            denied.policies[name + BAD_CUSTOM_SUFFIX].CopyFrom(out.policies[name])
        return denied
    return out


# --- filters ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthzFilters:
    """The RBAC filters of one workload: HTTP filters for HCM chains (first in the HCM),
    network filters for TCP chains (before tcp_proxy)."""

    http: tuple[hcm_pb2.HttpFilter, ...] = ()
    tcp: tuple[listener_components_pb2.Filter, ...] = ()


NO_AUTHZ_FILTERS = AuthzFilters()


@dataclass(frozen=True, slots=True)
class _RuleSet:
    """One action's RBAC: enforced rules, and dry-run policies' shadow rules."""

    rules: RBAC | None
    shadow: RBAC | None
    shadow_stat_prefix: str


def _is_dry_run(cfg: Config) -> bool:
    # Go's strconv.ParseBool, as Istio reads the annotation.
    return cfg.annotations.get(DRY_RUN_ANNOTATION, "") in ("1", "t", "T", "true", "TRUE", "True")


def _rule_set(
    policies: Sequence[Config], action: int, for_tcp: bool, *, custom: bool = False
) -> _RuleSet:
    enforced = [c for c in policies if not _is_dry_run(c)]
    dry_run = [c for c in policies if _is_dry_run(c)]
    rules = build_rbac(enforced, action, for_tcp=for_tcp, custom=custom) if enforced else None
    shadow = build_rbac(dry_run, action, for_tcp=for_tcp, custom=custom) if dry_run else None
    prefix = _SHADOW_STAT_PREFIX.get(shadow.action, "") if shadow is not None else ""
    return _RuleSet(rules, shadow, prefix)


def _rule_sets(policies: AuthzPolicies, for_tcp: bool) -> list[_RuleSet]:
    out = []
    if policies.custom:
        out.append(_rule_set(policies.custom, RBAC.DENY, for_tcp, custom=True))
    if policies.audit:
        out.append(_rule_set(policies.audit, RBAC.LOG, for_tcp))
    if policies.deny:
        out.append(_rule_set(policies.deny, RBAC.DENY, for_tcp))
    if policies.allow:
        out.append(_rule_set(policies.allow, RBAC.ALLOW, for_tcp))
    return out


def _http_filter(rs: _RuleSet) -> hcm_pb2.HttpFilter:
    rbac = http_rbac_pb2.RBAC()
    if rs.rules is not None:
        rbac.rules.CopyFrom(rs.rules)
    if rs.shadow is not None:
        rbac.shadow_rules.CopyFrom(rs.shadow)
        rbac.shadow_rules_stat_prefix = rs.shadow_stat_prefix
    return hcm_pb2.HttpFilter(name=HTTP_RBAC_FILTER, typed_config=pack(rbac))


def _network_filter(rs: _RuleSet) -> listener_components_pb2.Filter:
    rbac = network_rbac_pb2.RBAC(stat_prefix=TCP_STAT_PREFIX)
    if rs.rules is not None:
        rbac.rules.CopyFrom(rs.rules)
    if rs.shadow is not None:
        rbac.shadow_rules.CopyFrom(rs.shadow)
        rbac.shadow_rules_stat_prefix = rs.shadow_stat_prefix
    return listener_components_pb2.Filter(name=NETWORK_RBAC_FILTER, typed_config=pack(rbac))


def authz_filters(policies: AuthzPolicies) -> AuthzFilters:
    """RBAC filters for a workload's AuthorizationPolicies, in Istio's order. Policies
    annotated `istio.io/dry-run: "true"` only count (shadow rules, stats, dynamic
    metadata): they never allow or deny."""
    if policies.empty:
        return NO_AUTHZ_FILTERS
    http = tuple(_http_filter(rs) for rs in _rule_sets(policies, for_tcp=False))
    tcp = tuple(_network_filter(rs) for rs in _rule_sets(policies, for_tcp=True))
    return AuthzFilters(http, tcp)


def build_authz_filters(push: PushContext, proxy: Proxy) -> AuthzFilters:
    """The RBAC filters for `proxy`'s inbound chains."""
    return authz_filters(push.security.authorization_policies(proxy.namespace, proxy.labels))
