"""Analysis of AuthorizationPolicies, PeerAuthentications and Sidecar ingress TLS:
rules and values the RBAC translation skips (Istio skips them silently), policies
that are ignored, and features meshpilot does not support."""

from __future__ import annotations

from collections.abc import Iterator

from meshpilot.analysis.messages import (
    CONFLICTING_PEER_AUTHN,
    INVALID_AUTHZ,
    REFERENCED_RESOURCE_NOT_FOUND,
    UNSUPPORTED,
    Message,
    msg,
)
from meshpilot.api.networking import ServerTLSSettings
from meshpilot.api.security import AuthorizationPolicySpec, PeerAuthenticationSpec
from meshpilot.config import Config, kinds
from meshpilot.model.authz_rules import InvalidRule, bad_when_value, check_rule, ip_network, is_port
from meshpilot.model.push_context import PushContext

# --- security ---------------------------------------------------------------------------


def security(push: PushContext) -> Iterator[Message]:
    for cfg in push.configs(kinds.AUTHORIZATION_POLICY).values():
        yield from _authorization_policy(cfg)
    yield from _peer_authentications(push)
    for cfg in push.configs(kinds.SIDECAR).values():
        for i, il in enumerate(cfg.spec.ingress):
            if il.tls is not None:
                yield from _sidecar_ingress_tls(cfg, f"spec.ingress[{i}].tls", il.tls)


def _authorization_policy(cfg: Config) -> Iterator[Message]:
    spec: AuthorizationPolicySpec = cfg.spec
    if spec.target_ref is not None or spec.target_refs:
        yield msg(
            UNSUPPORTED,
            cfg,
            "spec.targetRefs" if spec.target_refs else "spec.targetRef",
            "targetRef policies apply to gateways and waypoints, which meshpilot does not "
            "build yet; no sidecar enforces this policy",
        )
    if spec.action == "CUSTOM":
        name = spec.provider.name if spec.provider is not None else ""
        yield msg(
            UNSUPPORTED,
            cfg,
            "spec.provider",
            f"CUSTOM authorization needs the ext_authz provider {name!r} from MeshConfig "
            "extensionProviders, which meshpilot does not support: as Istio does for a "
            "provider it cannot find, requests this policy matches are denied",
        )
    for i, rule in enumerate(spec.rules):
        path = f"spec.rules[{i}]"
        try:
            check_rule(rule)
        except InvalidRule as e:
            yield msg(INVALID_AUTHZ, cfg, f"{path}.when", f"{e}: this rule is skipped")
            continue
        jwt = any(
            f.source.request_principals or f.source.not_request_principals for f in rule.from_
        )
        jwt = jwt or any(c.key.startswith("request.auth.") for c in rule.when)
        if jwt:
            yield msg(
                UNSUPPORTED,
                cfg,
                path,
                "requestPrincipals and request.auth.* need RequestAuthentication (JWT), which "
                "meshpilot does not support: they never match (their not* forms always do)",
            )
        for j, f in enumerate(rule.from_):
            s = f.source
            for field, values in (
                ("ipBlocks", s.ip_blocks),
                ("notIpBlocks", s.not_ip_blocks),
                ("remoteIpBlocks", s.remote_ip_blocks),
                ("notRemoteIpBlocks", s.not_remote_ip_blocks),
            ):
                for v in values:
                    if ip_network(v) is None:
                        yield _bad_value(cfg, spec, f"{path}.from[{j}].source.{field}", v)
        for j, t in enumerate(rule.to):
            for field, values in (
                ("ports", t.operation.ports),
                ("notPorts", t.operation.not_ports),
            ):
                for v in values:
                    if not is_port(v):
                        yield _bad_value(cfg, spec, f"{path}.to[{j}].operation.{field}", v)
        for j, c in enumerate(rule.when):
            for v in (*c.values, *c.not_values):
                if bad_when_value(c.key, v):
                    yield _bad_value(cfg, spec, f"{path}.when[{j}]", v)


def _bad_value(cfg: Config, spec: AuthorizationPolicySpec, path: str, value: str) -> Message:
    effect = (
        "the rule is dropped (it can never allow)"
        if spec.action == "ALLOW"
        else "the value is ignored (the rule matches more)"
    )
    return msg(INVALID_AUTHZ, cfg, path, f"{value!r} is not valid here: {effect}")


def _peer_authentications(push: PushContext) -> Iterator[Message]:
    root = push.mesh.root_namespace
    wide: dict[str, list[Config]] = {}
    for cfg in push.configs(kinds.PEER_AUTHENTICATION).values():
        spec: PeerAuthenticationSpec = cfg.spec
        selected = spec.selector is not None and bool(spec.selector.match_labels)
        if selected and cfg.namespace == root:
            yield msg(
                UNSUPPORTED,
                cfg,
                "spec.selector",
                f"a PeerAuthentication with a selector in the root namespace {root} is "
                "ignored (as in Istio); put it in the workload's namespace",
            )
        if not selected:
            wide.setdefault(cfg.namespace, []).append(cfg)
            if spec.port_level_mtls:
                yield msg(
                    UNSUPPORTED,
                    cfg,
                    "spec.portLevelMtls",
                    "portLevelMtls needs a workload selector (as in Istio); it is ignored",
                )
    for ns, configs in wide.items():
        if len(configs) < 2:
            continue
        ordered = sorted(
            configs,
            key=lambda c: (
                c.creation_timestamp.timestamp() if c.creation_timestamp else 0.0,
                c.name,
            ),
        )
        scope = "mesh" if ns == root else f"namespace {ns}"
        text = (
            f"{len(configs)} PeerAuthentications without selector apply to the {scope}; "
            f"only the oldest, {ordered[0].name}, is used"
        )
        for cfg in ordered:
            yield msg(CONFLICTING_PEER_AUTHN, cfg, "spec", text)


def _sidecar_ingress_tls(cfg: Config, path: str, tls: ServerTLSSettings) -> Iterator[Message]:
    if tls.mode not in ("SIMPLE", "MUTUAL") or tls.credential_name:
        yield msg(
            UNSUPPORTED,
            cfg,
            path,
            "Sidecar ingress TLS supports SIMPLE and MUTUAL with certificate files; "
            "this port uses mesh mTLS (PeerAuthentication) instead",
        )
        return
    missing = [
        name
        for name, value in (
            ("serverCertificate", tls.server_certificate),
            ("privateKey", tls.private_key),
            ("caCertificates", tls.ca_certificates if tls.mode == "MUTUAL" else "x"),
        )
        if not value
    ]
    if missing:
        yield msg(
            REFERENCED_RESOURCE_NOT_FOUND,
            cfg,
            path,
            f"{tls.mode} needs {', '.join(missing)}; this port uses mesh mTLS "
            "(PeerAuthentication) instead",
        )
