"""Analysis findings: Istio's message codes and meshpilot's own, and their layout.

Istio's codes and names where Istio has one (IST0101 ReferencedResourceNotFound,
IST0109 ConflictingMeshGatewayVirtualServiceHosts, IST0112, IST0130, IST0173) and
meshpilot's own (MP....) where meshpilot behaves differently from Istio, does not
support something, or Istio accepts config silently that likely does not do what its
author meant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshpilot.config import Config

ERROR = "Error"
WARNING = "Warning"
INFO = "Info"

REFERENCED_RESOURCE_NOT_FOUND = ("IST0101", "ReferencedResourceNotFound", ERROR)
CONFLICTING_MESH_VS_HOSTS = ("IST0109", "ConflictingMeshGatewayVirtualServiceHosts", ERROR)
PORT_SELECTOR_REQUIRED = ("IST0112", "VirtualServiceDestinationPortSelectorRequired", ERROR)
UNREACHABLE_RULE = ("IST0130", "VirtualServiceUnreachableRule", WARNING)
SUBSET_SELECTS_NO_PODS = ("IST0173", "DestinationRuleSubsetNotSelectPods", ERROR)
# Istio merges DestinationRules for one host; meshpilot keeps the oldest.
CONFLICTING_DESTINATION_RULES = ("MP0001", "ConflictingDestinationRuleHosts", WARNING)
ZERO_TOTAL_WEIGHT = ("MP0002", "ZeroTotalWeight", ERROR)
UNSUPPORTED = ("MP0003", "UnsupportedConfig", WARNING)
# A rule or value the authorization translation skips (Istio skips it too, silently).
INVALID_AUTHZ = ("MP0004", "InvalidAuthorizationPolicyRule", ERROR)
# Several policies of one scope: only the oldest applies.
CONFLICTING_PEER_AUTHN = ("MP0005", "ConflictingPeerAuthentication", WARNING)
# Weights of a split that do not sum to 100: accepted, as Istio does (Envoy divides
# each weight by their sum), but often a typo in a traffic shift.
WEIGHTS_NOT_100 = ("MP0006", "RouteWeightsNotSumTo100", WARNING)
# A STRICT workload without `security.istio.io/tlsMode: istio`: clients send plaintext.
STRICT_WITHOUT_TLS_MODE = ("MP0007", "StrictWorkloadWithoutTlsModeLabel", ERROR)


@dataclass(frozen=True, slots=True)
class Message:
    """One finding about one object, with the field it is about."""

    code: str
    name: str
    level: str
    kind: str
    namespace: str
    object_name: str
    origin: str
    field: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "name": self.name,
            "level": self.level,
            "object": {"kind": self.kind, "namespace": self.namespace, "name": self.object_name},
            "origin": self.origin,
            "field": self.field,
            "message": self.message,
        }

    def __str__(self) -> str:
        """istioctl's layout: `Error [IST0101] (VirtualService default/reviews) ...`."""
        where = f" {self.origin}" if self.origin else ""
        field = f" {self.field}:" if self.field else ""
        return (
            f"{self.level} [{self.code}] ({self.kind} {self.namespace}/{self.object_name}"
            f"{where}){field} {self.message}"
        )


def msg(kind: tuple[str, str, str], cfg: Config, field: str, text: str) -> Message:
    code, name, level = kind
    return Message(code, name, level, cfg.kind, cfg.namespace, cfg.name, cfg.origin, field, text)
