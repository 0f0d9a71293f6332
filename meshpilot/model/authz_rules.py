"""What an AuthorizationPolicy rule may say, independent of how Envoy expresses it.

Istio's authz model (pilot/pkg/security/authz/model): the `when` keys it knows, the
`[NAME]` syntax of header and claim keys, and which values are IPs/CIDRs or ports.
Istio rejects a rule with an unknown key or a malformed bracket (InvalidRule) and
cannot translate a value that is not an IP, CIDR or port where one is expected
(Untranslatable). translators/authz.py builds RBAC filters on these rules and analysis
reports what they reject: one source of truth for both.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from meshpilot.api.security import Rule

# `when` keys (Istio's model.go), by where they land and what they match.
ATTR_REQUEST_HEADER = "request.headers"
ATTR_SRC_IP = "source.ip"
ATTR_REMOTE_IP = "remote.ip"
ATTR_SRC_NAMESPACE = "source.namespace"
ATTR_SRC_PRINCIPAL = "source.principal"
ATTR_REQUEST_PRINCIPAL = "request.auth.principal"
ATTR_REQUEST_AUDIENCES = "request.auth.audiences"
ATTR_REQUEST_PRESENTER = "request.auth.presenter"
ATTR_REQUEST_CLAIMS = "request.auth.claims"
ATTR_DEST_IP = "destination.ip"
ATTR_DEST_PORT = "destination.port"
ATTR_CONN_SNI = "connection.sni"

Target = Literal["permission", "principal"]

_PERMISSION_KEYS = frozenset({ATTR_DEST_IP, ATTR_DEST_PORT, ATTR_CONN_SNI})
_PRINCIPAL_KEYS = frozenset(
    {
        ATTR_SRC_IP,
        ATTR_REMOTE_IP,
        ATTR_SRC_NAMESPACE,
        ATTR_SRC_PRINCIPAL,
        ATTR_REQUEST_PRINCIPAL,
        ATTR_REQUEST_AUDIENCES,
        ATTR_REQUEST_PRESENTER,
    }
)
# `when` keys whose values must be IPs or CIDRs, and ports.
CIDR_KEYS = frozenset({ATTR_DEST_IP, ATTR_SRC_IP, ATTR_REMOTE_IP})
PORT_KEYS = frozenset({ATTR_DEST_PORT})


class Untranslatable(ValueError):
    """A value a filter cannot express: HTTP-only on TCP, or malformed."""


class InvalidRule(ValueError):
    """A rule Istio rejects as a whole (an unknown `when` key)."""


def when_kind(key: str) -> Target | None:
    """Whether a `when` key tests the request (permission) or the peer (principal);
    None for a key Istio does not know."""
    if key in _PERMISSION_KEYS:
        return "permission"
    if key in _PRINCIPAL_KEYS:
        return "principal"
    if key.startswith((ATTR_REQUEST_HEADER + "[", ATTR_REQUEST_CLAIMS + "[")):
        return "principal"
    return None


def names_in_brackets(text: str, *, nested: bool = True) -> list[str]:
    """`[a]` -> [a]; `[a][b]` -> [a, b] when nested."""
    if not (text.startswith("[") and text.endswith("]")) or len(text) < 3:
        raise InvalidRule(f"expected [NAME], found {text!r}")
    names = text[1:-1].split("][")
    if not nested and len(names) != 1:
        raise InvalidRule(f"expected [NAME], found {text!r}")
    if any(not n for n in names):
        raise InvalidRule(f"expected [NAME], found {text!r}")
    return names


def check_rule(rule: Rule) -> None:
    """Raise InvalidRule for a rule Istio skips as a whole: an unknown `when` key or a
    header/claim key without a well-formed `[NAME]`."""
    for cond in rule.when:
        if when_kind(cond.key) is None:
            raise InvalidRule(f"unknown attribute {cond.key}")
        if cond.key.startswith(ATTR_REQUEST_HEADER):
            names_in_brackets(cond.key.removeprefix(ATTR_REQUEST_HEADER), nested=False)
        elif cond.key.startswith(ATTR_REQUEST_CLAIMS):
            names_in_brackets(cond.key.removeprefix(ATTR_REQUEST_CLAIMS))


def ip_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    """An IP or CIDR as a network; None when it is neither (hostnames, typos)."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        return None


def is_port(value: str) -> bool:
    return value.strip().isdigit() and int(value) <= 65535


def bad_when_value(key: str, value: str) -> bool:
    """Whether a `when` value cannot be translated for its key (Untranslatable)."""
    if key in CIDR_KEYS:
        return ip_network(value) is None
    if key in PORT_KEYS:
        return not is_port(value)
    return False
