"""The per-type xDS handshake: nonces sent, ACKs, NACKs and stale answers.

Both sides of the mesh serve xDS: the control plane's ADS (meshpilot/xds/server.py)
and the agent's SDS (meshpilot/agent/sds.py). Each stream keeps, per type URL, the
nonce of the last response and what the client said about it. Envoy's rules, as
Istio applies them:

- a request without a nonce is not an answer to anything (a first request, or a
  reconnect to a server that never sent it a nonce);
- a nonce other than the last one sent is stale: the client has not seen the newest
  response yet, so the request says nothing about it (SotW ignores it whole);
- with the last nonce and an `error_detail`, it is a NACK: the client keeps its old
  config, and the same content must not be sent again; otherwise it is an ACK.

At most one response per type is un-ACKed at a time (`awaiting_ack`): what changes
meanwhile waits for the answer. This module imports only the discovery protos and the
standard library, so the agent shares it without loading the control plane.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import TypeAlias

from envoy.service.discovery.v3 import discovery_pb2

Request: TypeAlias = discovery_pb2.DiscoveryRequest | discovery_pb2.DeltaDiscoveryRequest

# NACK messages name the resource and the reason; longer ones are cut (the client
# controls them, and they reach logs and debug endpoints).
MAX_NACK_CHARS = 1024


class Kind(enum.Enum):
    """How a request was classified."""

    INIT = "init"
    ACK = "ack"
    NACK = "nack"
    STALE = "stale"
    # Delta request without a nonce: only subscription changes.
    SUBSCRIPTION = "subscription"


def nack_message(req: Request, limit: int = MAX_NACK_CHARS) -> str:
    """The error of a NACK as text of at most `limit` characters."""
    detail = req.error_detail
    text = detail.message or f"code {detail.code}"
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


@dataclass(slots=True, kw_only=True)
class Handshake:
    """One type URL on one stream: the last response sent and the client's answer."""

    nonce_sent: str = ""
    nonce_acked: str = ""
    version_sent: str = ""
    version_acked: str = ""
    # Message of the latest NACK; cleared by the next ACK so status shows the present.
    nack: str = ""
    nack_time: float = 0.0
    nacks: int = 0
    # A response with `nonce_sent` is on the wire and not yet ACKed or NACKed.
    awaiting_ack: bool = False

    def answers(self, nonce: str) -> bool:
        """True if `nonce` is that of the last response sent (so not stale)."""
        return nonce == self.nonce_sent

    def sent(self, nonce: str, version: str) -> None:
        """A response went out; it awaits its ACK or NACK."""
        self.nonce_sent = nonce
        self.version_sent = version
        self.awaiting_ack = True

    def answered(self, req: Request, version: str) -> Kind:
        """Record the ACK or NACK `req` (whose nonce answers() the last response) gives.

        `version` is what the client now runs when it ACKs (SotW: the request's
        version_info; Delta has none per type: the version sent).
        """
        self.awaiting_ack = False
        if req.HasField("error_detail"):
            self.nack = nack_message(req)
            self.nack_time = time.time()
            self.nacks += 1
            return Kind.NACK
        self.nonce_acked = req.response_nonce
        self.version_acked = version
        self.nack = ""
        return Kind.ACK

    def on_request(self, req: Request, version: str) -> Kind | None:
        """Classify a request by its nonce, recording an ACK or NACK.

        None when it carries no nonce (not an answer to any response).
        """
        nonce = req.response_nonce
        if not nonce:
            return None
        if not self.answers(nonce):
            return Kind.STALE
        return self.answered(req, version)
