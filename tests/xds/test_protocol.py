"""The handshake state machine shared by ADS and the agent's SDS, and the agent's
independence from the control plane."""

from __future__ import annotations

import json
import subprocess
import sys

from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from meshpilot.xds.protocol import MAX_NACK_CHARS, Handshake, Kind

CONTROL_PLANE = ("meshpilot.model", "meshpilot.translators", "meshpilot.api")
CONTROL_PLANE += ("meshpilot.discovery", "meshpilot.serve", "meshpilot.config")


def _req(nonce: str = "", error: str | None = None) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(response_nonce=nonce, version_info="v1")
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def test_ack_nack_stale_and_no_nonce() -> None:
    h = Handshake()
    assert h.on_request(_req(), "v1") is None
    h.sent("n1", "v1")
    assert h.awaiting_ack
    assert h.on_request(_req("n0"), "v1") is Kind.STALE
    assert h.awaiting_ack
    assert h.on_request(_req("n1", error="bad"), "v1") is Kind.NACK
    assert (h.nack, h.nacks, h.awaiting_ack, h.nonce_acked) == ("bad", 1, False, "")
    h.sent("n2", "v2")
    assert h.on_request(_req("n2"), "v2") is Kind.ACK
    assert (h.nack, h.nonce_acked, h.version_acked) == ("", "n2", "v2")


def test_nack_messages_are_bounded() -> None:
    h = Handshake()
    h.sent("n1", "v1")
    h.on_request(_req("n1", error="e" * 1_000_000), "v1")
    assert h.nack.startswith("e" * MAX_NACK_CHARS) and len(h.nack) < MAX_NACK_CHARS + 32


def test_the_agent_and_the_protocol_module_load_no_control_plane_module() -> None:
    code = (
        "import sys, json\n"
        "import meshpilot.agent.command, meshpilot.xds.protocol\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('meshpilot'))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = json.loads(out.stdout)
    assert "meshpilot.agent.sds" in loaded and "meshpilot.xds.protocol" in loaded
    assert not [m for m in loaded if m.startswith(CONTROL_PLANE)]
    # Of the xDS package, the agent needs the handshake only.
    assert [m for m in loaded if m.startswith("meshpilot.xds.")] == ["meshpilot.xds.protocol"]
