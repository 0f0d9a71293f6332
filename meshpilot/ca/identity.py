"""SPIFFE workload identities: `spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT`.

Parsing is strict on purpose: the string ends up as the only SAN of a certificate
and is compared byte for byte by Envoy and by AuthorizationPolicy principals, so
two spellings of one identity (case, percent-encoding, trailing slash, a port or
userinfo) must never both be accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe://"

# SPIFFE-ID spec: trust domain is lowercase letters, digits, '.', '-' and '_'.
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
# Kubernetes: a namespace is a DNS-1123 label, a service account a DNS-1123 subdomain.
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class IdentityError(ValueError):
    """A string that is not an acceptable SPIFFE workload identity."""


def check_trust_domain(value: str) -> str:
    if not _TRUST_DOMAIN.fullmatch(value) or value.strip(".") != value or ".." in value:
        raise IdentityError(
            f"trust domain {value!r}: expected lowercase letters, digits, '.', '-' or '_', "
            "e.g. cluster.local"
        )
    return value


def check_namespace(value: str) -> str:
    if not _LABEL.fullmatch(value):
        raise IdentityError(
            f"namespace {value!r}: expected a DNS-1123 label (lowercase alphanumerics and '-', "
            "at most 63 characters)"
        )
    return value


def check_service_account(value: str) -> str:
    if len(value) > 253 or not _SUBDOMAIN.fullmatch(value):
        raise IdentityError(
            f"service account {value!r}: expected a DNS-1123 subdomain (lowercase "
            "alphanumerics, '-' and '.', at most 253 characters)"
        )
    return value


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """One workload identity; `str()` gives the canonical URI."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        check_trust_domain(self.trust_domain)
        check_namespace(self.namespace)
        check_service_account(self.service_account)

    def __str__(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def uri(self) -> str:
        return str(self)

    @classmethod
    def parse(cls, text: str, trust_domain: str | None = None) -> SpiffeId:
        """Parse the canonical form only; with `trust_domain`, it must match too."""
        if not isinstance(text, str) or not text.startswith(SCHEME):
            raise IdentityError(f"{text!r}: expected {SCHEME}TRUST_DOMAIN/ns/NS/sa/SA")
        parts = text[len(SCHEME) :].split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise IdentityError(f"{text!r}: expected {SCHEME}TRUST_DOMAIN/ns/NS/sa/SA")
        ident = cls(parts[0], parts[2], parts[4])
        if trust_domain is not None and ident.trust_domain != trust_domain:
            raise IdentityError(
                f"{text!r}: trust domain {ident.trust_domain!r} is not {trust_domain!r}"
            )
        return ident
