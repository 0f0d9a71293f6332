"""Config analysis: config that parses but will not do what its author meant.

Like `istioctl analyze`, with Istio's codes and names where Istio has one
(IST0101 ReferencedResourceNotFound, IST0109 ConflictingMeshGatewayVirtualServiceHosts,
IST0112, IST0130, IST0173) and meshpilot's own (MP....) where meshpilot behaves
differently from Istio or does not support something: MP0003 unsupported config,
MP0004 AuthorizationPolicy rules or values the RBAC translation skips (Istio skips them
silently), MP0005 several PeerAuthentications in one scope, MP0006 split weights that
do not sum to 100, MP0007 a STRICT workload whose endpoints lack the
`security.istio.io/tlsMode: istio` label auto mTLS needs. A pure function of one
PushContext; the server logs what appears and clears (log.py) and lists the result at
/debug/configz.

A floor above the model: it reads api/ and model/ and never the translators, so that
what it says about the translation comes from the same model rules the translators use
(model/authz_rules.py), not from their Envoy output.
"""

from __future__ import annotations

from meshpilot.analysis.messages import Message
from meshpilot.analysis.mtls import strict_without_tls_mode
from meshpilot.analysis.routing import (
    destination_rules,
    virtual_service,
    virtual_service_conflicts,
)
from meshpilot.analysis.security import security
from meshpilot.model.push_context import PushContext

__all__ = ["Message", "analyze"]


def analyze(push: PushContext) -> list[Message]:
    """Every finding, sorted by object and field so that output is stable."""
    out: list[Message] = []
    for vs in push.virtual_services_all:
        out.extend(virtual_service(push, vs))
    out.extend(virtual_service_conflicts(push))
    out.extend(destination_rules(push))
    out.extend(security(push))
    out.extend(strict_without_tls_mode(push))
    return sorted(
        dict.fromkeys(out),
        key=lambda m: (m.kind, m.namespace, m.object_name, m.field, m.code, m.message),
    )
