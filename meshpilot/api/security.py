"""Typed models of security.istio.io specs (v1 and v1beta1)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from meshpilot.api.base import IstioModel, Labels

MtlsMode = Literal["UNSET", "DISABLE", "PERMISSIVE", "STRICT"]


class LabelSelector(IstioModel):
    match_labels: Labels = Field(default_factory=dict)


class PolicyTargetReference(IstioModel):
    group: str = ""
    kind: str
    name: str
    namespace: str = ""


class MutualTLS(IstioModel):
    mode: MtlsMode = "UNSET"


class PeerAuthenticationSpec(IstioModel):
    selector: LabelSelector | None = None
    mtls: MutualTLS | None = None
    port_level_mtls: dict[int, MutualTLS] = Field(default_factory=dict)


class Source(IstioModel):
    principals: list[str] = Field(default_factory=list)
    not_principals: list[str] = Field(default_factory=list)
    request_principals: list[str] = Field(default_factory=list)
    not_request_principals: list[str] = Field(default_factory=list)
    namespaces: list[str] = Field(default_factory=list)
    not_namespaces: list[str] = Field(default_factory=list)
    service_accounts: list[str] = Field(default_factory=list)
    not_service_accounts: list[str] = Field(default_factory=list)
    ip_blocks: list[str] = Field(default_factory=list)
    not_ip_blocks: list[str] = Field(default_factory=list)
    remote_ip_blocks: list[str] = Field(default_factory=list)
    not_remote_ip_blocks: list[str] = Field(default_factory=list)


class Operation(IstioModel):
    hosts: list[str] = Field(default_factory=list)
    not_hosts: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list)
    not_ports: list[str] = Field(default_factory=list)
    methods: list[str] = Field(default_factory=list)
    not_methods: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    not_paths: list[str] = Field(default_factory=list)


class RuleFrom(IstioModel):
    source: Source


class RuleTo(IstioModel):
    operation: Operation


class Condition(IstioModel):
    key: str = Field(min_length=1)
    values: list[str] = Field(default_factory=list)
    not_values: list[str] = Field(default_factory=list)


class Rule(IstioModel):
    from_: list[RuleFrom] = Field(default_factory=list, alias="from")
    to: list[RuleTo] = Field(default_factory=list)
    when: list[Condition] = Field(default_factory=list)


class ExtensionProvider(IstioModel):
    name: str


class AuthorizationPolicySpec(IstioModel):
    selector: LabelSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: list[PolicyTargetReference] = Field(default_factory=list)
    rules: list[Rule] = Field(default_factory=list)
    action: Literal["ALLOW", "DENY", "AUDIT", "CUSTOM"] = "ALLOW"
    provider: ExtensionProvider | None = None
