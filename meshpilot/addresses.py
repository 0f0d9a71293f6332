"""IP address checks and HOST:PORT parsing shared by the registry, the translators,
the CA, the agent and the CLI."""

from __future__ import annotations

import ipaddress
import re

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Dotted-quad IPv4 as `ipaddress` accepts it (no leading zeros): the common case, and
# a regex match costs a tenth of parsing it into an address object.
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")


def is_ip(text: str) -> bool:
    """True for an IPv4 or IPv6 literal (not a hostname)."""
    if _IPV4.fullmatch(text):
        return True
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


def split_address(text: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`) to a tuple; ValueError with the expected form."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:15010")
    return host.strip("[]") or "0.0.0.0", int(port)
