"""Who a secure-port call comes from, and the TLS server context of the port.

The TLS front relays each client connection to the internal gRPC server over its own
loopback socket; `PeerTable` maps that socket, as gRPC names it in
`context.peer()`, to the TLS client's verified certificate and real address.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import unquote

import grpc
from cryptography import x509

from meshpilot.secretfile import secret_file


@dataclass(frozen=True, slots=True)
class TlsPeer:
    """One client of the secure port, as seen by the TLS front."""

    remote: str
    cert: x509.Certificate | None


class PeerTable:
    """Relay connections by the gRPC peer string of their upstream side."""

    def __init__(self) -> None:
        self._peers: dict[str, TlsPeer] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def add(self, grpc_peer: str, peer: TlsPeer) -> None:
        self._peers[grpc_peer] = peer

    def remove(self, grpc_peer: str) -> None:
        self._peers.pop(grpc_peer, None)

    def get(self, grpc_peer: str) -> TlsPeer | None:
        return self._peers.get(grpc_peer)

    def for_context(self, context: grpc.aio.ServicerContext) -> TlsPeer | None:
        return self._peers.get(normalise_peer(context.peer() or ""))


def normalise_peer(grpc_peer: str) -> str:
    """`context.peer()` in the form of grpc_peer_string: grpc percent-encodes the
    brackets of IPv6 addresses (`ipv6:%5B::1%5D:5000`)."""
    return unquote(grpc_peer)


def grpc_peer_string(sockname: tuple[str, int] | tuple[str, int, int, int]) -> str:
    """How grpc's `context.peer()` names the client at this socket address."""
    host, port = sockname[0], sockname[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"


def server_context(chain_pem: str, key_pem: str, root_pem: str) -> ssl.SSLContext:
    """A TLS server context: our chain, client certificates optional but verified."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # gRPC clients refuse a server that does not negotiate h2 by ALPN.
    ctx.set_alpn_protocols(["h2"])
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=root_pem)
    with secret_file(chain_pem + key_pem) as path:
        ctx.load_cert_chain(path)
    return ctx
