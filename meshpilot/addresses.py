"""IP address checks shared by the registry, the translators and the agent."""

from __future__ import annotations

import ipaddress


def is_ip(text: str) -> bool:
    """True for an IPv4 or IPv6 literal (not a hostname)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False
