"""Config analysis: config that parses but will not do what its author meant.

Like `istioctl analyze`, with Istio's codes and names where Istio has one
(IST0101 ReferencedResourceNotFound, IST0109 ConflictingMeshGatewayVirtualServiceHosts,
IST0112, IST0130, IST0173) and meshpilot's own (MP....) where meshpilot behaves
differently from Istio or does not support something: MP0003 unsupported config,
MP0004 AuthorizationPolicy rules or values the RBAC translation skips (Istio skips them
silently), MP0005 several PeerAuthentications in one scope, MP0006 split weights that
do not sum to 100, MP0007 a STRICT workload whose endpoints lack the
`security.istio.io/tlsMode: istio` label auto mTLS needs. A pure function of one
PushContext, in two parts: what depends on config only, and what depends on endpoints
too (so that endpoint-only pushes recompute only the second). The server logs what
appears and clears after each push (reporter.py) and lists the result at
/debug/configz.

A floor above the model: it reads api/ and model/ and never the translators, so that
what it says about the translation comes from the same model rules the translators use
(model/authz_rules.py), not from their Envoy output.
"""

from __future__ import annotations

from collections.abc import Iterable

from meshpilot.analysis.messages import Message
from meshpilot.analysis.mtls import strict_without_tls_mode
from meshpilot.analysis.routing import (
    destination_rule_conflicts,
    subsets_selecting_no_endpoints,
    virtual_service,
    virtual_service_conflicts,
)
from meshpilot.analysis.security import security
from meshpilot.model.push_context import PushContext

__all__ = [
    "Message",
    "analyze",
    "config_findings",
    "endpoint_findings",
    "endpoint_findings_by_host",
    "ordered",
]


def analyze(push: PushContext) -> list[Message]:
    """Every finding, sorted by object and field so that output is stable."""
    return ordered([*config_findings(push), *endpoint_findings(push)])


def config_findings(push: PushContext) -> list[Message]:
    """Findings that depend on services and config, not on endpoints: equal for two
    contexts that share services and routing/security indexes (an endpoint-only
    context shares them with the one it came from)."""
    out: list[Message] = []
    for vs in push.virtual_services_all:
        out.extend(virtual_service(push, vs))
    out.extend(virtual_service_conflicts(push))
    out.extend(destination_rule_conflicts(push))
    out.extend(security(push))
    return out


def endpoint_findings(push: PushContext) -> list[Message]:
    """Findings that look at endpoints: subsets that select none, STRICT workloads
    without the tlsMode label."""
    return [m for found in endpoint_findings_by_host(push, push.services).values() for m in found]


def endpoint_findings_by_host(push: PushContext, hosts: Iterable[str]) -> dict[str, list[Message]]:
    """`endpoint_findings` of each of `hosts` (services), so that a caller can redo
    only the hosts whose endpoints changed."""
    return {
        host: [
            *subsets_selecting_no_endpoints(push, (host,)),
            *strict_without_tls_mode(push, (host,)),
        ]
        for host in hosts
    }


def ordered(messages: Iterable[Message]) -> list[Message]:
    """Without duplicates, sorted by object, field, code and text."""
    return sorted(
        dict.fromkeys(messages),
        key=lambda m: (m.kind, m.namespace, m.object_name, m.field, m.code, m.message),
    )
