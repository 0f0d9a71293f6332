from __future__ import annotations

import pytest

from meshpilot.ca.identity import IdentityError, SpiffeId


def test_format_and_parse_round_trip() -> None:
    ident = SpiffeId("cluster.local", "default", "bookinfo-productpage")
    assert str(ident) == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    assert SpiffeId.parse(str(ident)) == ident
    assert SpiffeId.parse(str(ident), "cluster.local") == ident


def test_service_account_may_be_a_dns_subdomain() -> None:
    assert SpiffeId.parse("spiffe://td/ns/a/sa/b.c-d").service_account == "b.c-d"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "spiffe://",
        "SPIFFE://cluster.local/ns/default/sa/sleep",
        "spiffe://Cluster.local/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/Default/sa/sleep",
        "spiffe://cluster.local/ns/default/sa/sleep/",
        "spiffe://cluster.local/ns/default/sa/",
        "spiffe://cluster.local/ns//sa/sleep",
        "spiffe://cluster.local/ns/default/sa/sleep/extra",
        "spiffe://cluster.local/sa/sleep/ns/default",
        "spiffe://cluster.local:443/ns/default/sa/sleep",
        "spiffe://user@cluster.local/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/def%61ult/sa/sleep",
        "spiffe://cluster.local/ns/default/sa/sleep?x=1",
        "spiffe://cluster.local/ns/default/sa/sleep#f",
        "spiffe://.cluster.local/ns/default/sa/sleep",
        "spiffe://cluster..local/ns/default/sa/sleep",
        "https://cluster.local/ns/default/sa/sleep",
        "spiffe://cluster.local/ns/-default/sa/sleep",
        "spiffe://cluster.local/ns/" + "a" * 64 + "/sa/sleep",
        " spiffe://cluster.local/ns/default/sa/sleep",
    ],
)
def test_rejects_non_canonical_or_invalid(text: str) -> None:
    with pytest.raises(IdentityError):
        SpiffeId.parse(text)


def test_wrong_trust_domain_is_refused() -> None:
    with pytest.raises(IdentityError, match="trust domain"):
        SpiffeId.parse("spiffe://other.domain/ns/default/sa/sleep", "cluster.local")


def test_constructor_validates() -> None:
    with pytest.raises(IdentityError, match="namespace"):
        SpiffeId("cluster.local", "Bad_NS", "sa")
