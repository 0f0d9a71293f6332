"""IP literal checks agree with the standard library on every kind of input."""

from __future__ import annotations

import ipaddress

import pytest

from meshpilot.addresses import is_ip, is_ipv4


def _stdlib(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


CASES = [
    "10.0.0.1",
    "0.0.0.0",
    "255.255.255.255",
    "256.1.1.1",
    "1.2.3",
    "1.2.3.4.5",
    "01.2.3.4",
    "1.2.3.04",
    "1.2.3.4 ",
    " 1.2.3.4",
    "1.2.3.4\n",
    "1..3.4",
    "a.b.c.d",
    "reviews.default.svc.cluster.local",
    "::1",
    "fe80::1%eth0",
    "2001:db8::",
    "::ffff:10.0.0.1",
    "",
    "\u0661.\u0662.\u0663.\u0664",  # digits, but not ASCII ones
]


@pytest.mark.parametrize("text", CASES)
def test_is_ip_matches_ipaddress(text: str) -> None:
    assert is_ip(text) is _stdlib(text)


def test_is_ipv4() -> None:
    assert is_ipv4("10.0.0.1")
    assert not is_ipv4("::1")
    assert not is_ipv4("host")
