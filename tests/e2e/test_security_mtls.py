"""Mutual TLS end to end: real agents (`meshpilot agent`), real
Envoys, real certificates from the CA, real TLS handshakes between the sidecars.

Point 7's other half, a client without a valid certificate refused on the secure port
(none, or one from another CA), is `test_ca.py::
test_ads_on_secure_port_needs_a_valid_workload_certificate`; `test_agent.py` shows the
agent's Envoy connected. Here the two Envoys of the mesh get all of their config (the
listeners and clusters the requests go through) over mutual TLS on that port.

Istio's semantics, as the tests assert them:

* Auto mTLS: the client originates ISTIO_MUTUAL to endpoints labelled
  `security.istio.io/tlsMode: istio`, through `transport_socket_matches`, unless the
  destination namespace's (or the mesh's) PeerAuthentication is DISABLE. A workload-level
  DISABLE is invisible to it (BestEffortInferServiceMTLSMode looks at namespace and mesh
  policies only), so the client keeps sending mTLS there until a DestinationRule says
  `tls.mode: DISABLE`.
* The server sets `x-forwarded-client-cert` (`By`, `Hash`, `Subject`, `URI`) on mTLS
  connections and strips any the peer sent over plaintext.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.e2e.harness import HttpResult, ProcessTracker, wait_for
from tests.e2e.secure_mesh import (
    ALT_PORT,
    SERVER_PORT,
    SERVER_SNI,
    SYNCZ_TYPES,
    SecureMesh,
    as_text,
    chain_is_mtls,
    inbound_chains,
    peer_authentication_yaml,
    spiffe,
    start_secure_mesh,
    upstream_tls_to_server,
)

FORGED_XFCC = (
    "By=spiffe://cluster.local/ns/default/sa/server;URI=spiffe://cluster.local/ns/default/sa/admin"
)
CONVERGE_S = 10.0


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Not tmp_path: the agents' SDS socket paths must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="mp-sec-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def parse_xfcc(value: str) -> list[dict[str, str]]:
    """`x-forwarded-client-cert` elements (comma separated) as key/value dicts."""
    out = []
    for element in value.split(","):
        fields: dict[str, str] = {}
        for pair in element.split(";"):
            key, _, val = pair.partition("=")
            fields[key.strip()] = val.strip().strip('"')
        out.append(fields)
    return out


def leaf_sha256(chain_file: Path) -> str:
    """Hex SHA-256 of the DER of the first certificate in a PEM file (XFCC's `Hash`)."""
    leaf = x509.load_pem_x509_certificate(chain_file.read_bytes())
    return hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest()


async def ok(request: Awaitable[HttpResult]) -> HttpResult | None:
    resp = await request
    return resp if resp.status == 200 else None


def last_xfcc(mesh: SecureMesh) -> str | None:
    return mesh.app.requests[-1].headers.get("x-forwarded-client-cert")


async def mesh_call_over_mtls(mesh: SecureMesh, path: str = "/") -> str | None:
    """A request from `client` that reached the app over mTLS from the client's identity:
    the XFCC it carried, else None."""
    resp = await mesh.call("client", path)
    if resp.status != 200 or mesh.app.requests[-1].path != path:
        return None
    xfcc = last_xfcc(mesh)
    return xfcc if xfcc and f"URI={spiffe('client')}" in xfcc else None


async def mesh_call_plaintext(mesh: SecureMesh, path: str = "/") -> bool:
    """A request from `client` that reached the app without mTLS (no XFCC)."""
    resp = await mesh.call("client", path)
    return resp.status == 200 and mesh.app.requests[-1].path == path and not last_xfcc(mesh)


async def plaintext_ok(mesh: SecureMesh, port: int = SERVER_PORT, path: str = "/plain") -> bool:
    resp = await mesh.plaintext(path, port)
    return resp.status == 200 and mesh.app.requests[-1].path == path


# --- mTLS and XFCC ----------------------------------------------------------------------


async def test_mesh_traffic_is_mutual_tls_with_the_client_identity_in_xfcc(
    processes: ProcessTracker, tmp_path: Path, short_dir: Path
) -> None:
    t0 = time.monotonic()
    mesh = await start_secure_mesh(processes, tmp_path, short_dir, clients={"client": "client"})
    client, server = mesh.clients["client"], mesh.server
    started_s = time.monotonic() - t0

    # A forged XFCC from the client app must not survive its own sidecar.
    forged = {"x-forwarded-client-cert": FORGED_XFCC}
    resp = await wait_for(
        lambda: ok(mesh.call("client", "/hello", headers=forged)),
        CONVERGE_S,
        message="client -> server through the sidecars",
    )
    assert resp.json()["path"] == "/hello"
    seen = mesh.app.requests[-1]
    assert seen.path == "/hello"
    xfcc = seen.headers.get("x-forwarded-client-cert")
    assert xfcc, f"the server app got no x-forwarded-client-cert: {seen.headers}"
    (element,) = parse_xfcc(xfcc)  # exactly one: the forged one was dropped
    assert element.get("URI") == spiffe("client"), xfcc
    assert element.get("By") == spiffe("server"), xfcc
    assert element.get("Hash") == leaf_sha256(client.agent.workdir / "cert-chain.pem"), xfcc

    # Real TLS on both ends: the client's cluster handshook, the server's listener too.
    handshakes_out = await client.handshakes_to_server()
    handshakes_in = await server.handshakes_in()
    assert handshakes_out >= 1 and handshakes_in >= 1, (handshakes_out, handshakes_in)

    # What the client's Envoy holds: ISTIO_MUTUAL for the sidecar endpoint (auto mTLS).
    ctx = await upstream_tls_to_server(client)
    assert ctx is not None, "the client sends plaintext to an endpoint with tlsMode istio"
    assert ctx.get("sni") == SERVER_SNI
    common = ctx["common_tls_context"]
    assert [s["name"] for s in common["tls_certificate_sds_secret_configs"]] == ["default"]
    assert "ROOTCA" in as_text(common.get("combined_validation_context", {}))
    assert spiffe("server") in as_text(common), "the server's identity is not verified"
    assert common.get("alpn_protocols", [])[:2] == ["istio-peer-exchange", "istio"]
    # ... and the server's inbound listener terminates mTLS (PERMISSIVE by default).
    assert any(chain_is_mtls(c) for c in await inbound_chains(server))

    # Plaintext straight to the server's inbound port (PERMISSIVE): accepted, and an
    # XFCC sent over plaintext is stripped, never believed.
    plain = await mesh.plaintext("/direct", headers=forged)
    assert plain.status == 200
    assert mesh.app.requests[-1].path == "/direct"
    assert "x-forwarded-client-cert" not in mesh.app.requests[-1].headers

    # Point 7: both Envoys got all that config over mutual TLS on the secure port.
    syncz = await mesh.syncz()
    for w in (client, server):
        entry = syncz[w.node_id]
        for t in SYNCZ_TYPES:
            assert entry[f"{t}_sent"] and entry[f"{t}_sent"] == entry[f"{t}_acked"], (t, entry)
        static = await w.config_dump("static_clusters")
        (xds,) = [c["cluster"] for c in static if c["cluster"]["name"] == "xds-grpc"]
        sock = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        sock = sock["address"]["socket_address"]
        assert f"{sock['address']}:{sock['port_value']}" == mesh.cp.secure_address
        tls = xds["transport_socket"]["typed_config"]["common_tls_context"]
        assert [s["name"] for s in tls["tls_certificate_sds_secret_configs"]] == ["default"]
        assert await w.stat("cluster.xds-grpc.ssl.handshake") >= 1
        assert await w.stat("control_plane.connected_state") == 1
    print(
        f"\nmesh of 2 agents up (LIVE) in {started_s:.1f} s; "
        f"TLS handshakes client cluster {handshakes_out}, server listener {handshakes_in}"
    )


# --- PeerAuthentication ------------------------------------------------------------------------


async def test_peer_authentication_strict_permissive_disable_and_port_level(
    processes: ProcessTracker, tmp_path: Path, short_dir: Path
) -> None:
    mesh = await start_secure_mesh(processes, tmp_path, short_dir, clients={"client": "client"})
    client = mesh.clients["client"]
    await wait_for(lambda: mesh_call_over_mtls(mesh), CONVERGE_S, message="mesh traffic")

    # STRICT, namespace-wide: plaintext to the inbound port is refused (no HTTP answer;
    # the TLS layer reads garbage and closes), and so is TLS without a client
    # certificate; mesh traffic keeps working over mTLS, on both ports.
    mesh.write("pa-namespace.yaml", peer_authentication_yaml("default", "STRICT"))
    await mesh.converge("STRICT: plaintext refused", lambda: _refused(mesh, SERVER_PORT))
    await mesh.converge(
        "STRICT: plaintext refused on the other port", lambda: _refused(mesh, ALT_PORT)
    )
    assert await mesh.tls_without_client_cert_refused() is not None
    assert await mesh_call_over_mtls(mesh, "/strict")
    assert all(chain_is_mtls(c) for c in await inbound_chains(mesh.server))

    # PERMISSIVE, namespace-wide: both.
    mesh.write("pa-namespace.yaml", peer_authentication_yaml("default", "PERMISSIVE"))
    await mesh.converge("PERMISSIVE: plaintext accepted", lambda: plaintext_ok(mesh))
    assert await mesh_call_over_mtls(mesh, "/permissive")
    await mesh.converge(
        "PERMISSIVE: plaintext accepted on the other port", lambda: plaintext_ok(mesh, ALT_PORT)
    )

    # STRICT selecting the workload beats the namespace's PERMISSIVE.
    selector = {"app": "server"}
    mesh.write("pa-server.yaml", peer_authentication_yaml("server", "STRICT", selector=selector))
    await mesh.converge("workload STRICT: plaintext refused", lambda: _refused(mesh, SERVER_PORT))
    assert await mesh_call_over_mtls(mesh, "/workload-strict")

    # Port level: the namespace says STRICT, the workload policy sets no mode (inherits
    # STRICT) but DISABLE on ALT_PORT: plaintext there only.
    mesh.write("pa-namespace.yaml", peer_authentication_yaml("default", "STRICT"))
    mesh.write(
        "pa-server.yaml",
        peer_authentication_yaml(
            "server", None, selector=selector, port_modes={ALT_PORT: "DISABLE"}
        ),
    )
    await mesh.converge(
        "portLevelMtls DISABLE: plaintext accepted", lambda: plaintext_ok(mesh, ALT_PORT)
    )
    assert await _refused(mesh, SERVER_PORT)
    assert await mesh_call_over_mtls(mesh, "/port-level")
    assert not any(chain_is_mtls(c) for c in await inbound_chains(mesh.server, ALT_PORT))

    # DISABLE, namespace-wide: plaintext only, and auto mTLS stops originating TLS.
    mesh.remove("pa-server.yaml")
    mesh.write("pa-namespace.yaml", peer_authentication_yaml("default", "DISABLE"))
    await mesh.converge(
        "namespace DISABLE: client stops mTLS", lambda: mesh_call_plaintext(mesh, "/d")
    )
    assert await upstream_tls_to_server(client) is None
    assert await plaintext_ok(mesh)
    assert not any(chain_is_mtls(c) for c in await inbound_chains(mesh.server))
    handshakes = await mesh.server.handshakes_in()
    assert await mesh_call_plaintext(mesh, "/disabled")
    assert await mesh.server.handshakes_in() == handshakes

    # DISABLE on the workload only: auto mTLS cannot see it and still originates mTLS,
    # which a plaintext-only port does not accept (Istio: add a DestinationRule)...
    mesh.remove("pa-namespace.yaml")
    mesh.write("pa-server.yaml", peer_authentication_yaml("server", "DISABLE", selector=selector))
    await mesh.converge(
        "workload DISABLE: client back to auto mTLS", lambda: upstream_tls_to_server(client)
    )
    assert await plaintext_ok(mesh)
    assert (await mesh.call("client", "/refused")).status == 503
    # ... and with `tls.mode: DISABLE` in a DestinationRule the client sends plaintext.
    mesh.write("dr-server.yaml", DR_DISABLE)
    await mesh.converge(
        "DestinationRule DISABLE: plaintext mesh traffic", lambda: mesh_call_plaintext(mesh, "/dr")
    )
    assert await upstream_tls_to_server(client) is None
    print(
        "\nconvergence after each config change: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in mesh.timings.items())
    )


DR_DISABLE = """apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: server, namespace: default}
spec:
  host: server.default.svc.cluster.local
  trafficPolicy:
    tls: {mode: DISABLE}
"""


async def _refused(mesh: SecureMesh, port: int) -> bool:
    return await mesh.plaintext_refused(port) is not None
