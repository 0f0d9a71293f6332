"""End to end: AuthorizationPolicy on the server's sidecar,
with identities from real certificates (agents, CA, mTLS between the sidecars).

Istio's evaluation order: CUSTOM, then DENY, then ALLOW; with any ALLOW policy on a
workload a request must match one of them; an ALLOW policy without rules matches
nothing and `rules: [{}]` matches everything. `principals` come from the peer
certificate, so a plaintext request has none.

The first test has its policies from the start; the second changes them while the
sidecars hold keep-alive connections, as a running mesh does.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Awaitable, Iterator, Mapping
from pathlib import Path

import pytest

from tests.e2e.harness import HttpResult, ProcessTracker, wait_for
from tests.e2e.secure_mesh import SecureMesh, principal, spiffe, start_secure_mesh

CONVERGE_S = 10.0
DENIED_BODY = "RBAC: access denied"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Not tmp_path: the agents' SDS socket paths must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="mp-authz-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def policy_yaml(name: str, action: str, rules: str | None) -> str:
    """An AuthorizationPolicy selecting the server; `rules` is YAML for `spec.rules`."""
    text = f"""apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: default}}
spec:
  selector:
    matchLabels: {{app: server}}
  action: {action}
"""
    return text + (f"  rules:\n{rules}" if rules is not None else "")


ALLOW_CLIENT_GET_ALLOWED = f"""  - from:
    - source:
        principals: ["{principal("client")}"]
    to:
    - operation:
        methods: ["GET"]
        paths: ["/allowed"]
"""

DENY_FLAGGED = """  - to:
    - operation:
        paths: ["/allowed"]
    when:
    - key: request.headers[x-deny]
      values: ["yes"]
"""


async def status(
    mesh: SecureMesh,
    client: str,
    path: str,
    *,
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
) -> int:
    return (await mesh.call(client, path, method=method, headers=headers)).status


def denied(resp: HttpResult) -> bool:
    return resp.status == 403 and DENIED_BODY in resp.text


async def test_authorization_policy_allow_principal_and_deny_wins(
    processes: ProcessTracker, tmp_path: Path, short_dir: Path
) -> None:
    policies = {
        "authz-allow.yaml": policy_yaml("allow-client", "ALLOW", ALLOW_CLIENT_GET_ALLOWED),
        "authz-deny.yaml": policy_yaml("deny-flagged", "DENY", DENY_FLAGGED),
    }
    mesh = await start_secure_mesh(
        processes,
        tmp_path,
        short_dir,
        clients={"client": "client", "other": "other"},
        extra_config=policies,
    )
    await wait_for(
        lambda: _is(status(mesh, "client", "/allowed"), 200),
        CONVERGE_S,
        message="the client's GET /allowed through the sidecars",
    )
    seen = len(mesh.app.requests)
    ok, other_path, post, other_sa, plain, flagged, unflagged = await asyncio.gather(
        mesh.call("client", "/allowed"),
        mesh.call("client", "/other"),
        mesh.call("client", "/allowed", method="POST"),
        # Another service account, over mTLS too: its principal is not allowed.
        mesh.call("other", "/allowed"),
        # Plaintext straight to the inbound port (PERMISSIVE): no peer certificate,
        # hence no principal.
        mesh.plaintext("/allowed"),
        # DENY wins over the ALLOW that matches as well.
        mesh.call("client", "/allowed", headers={"x-deny": "yes"}),
        mesh.call("client", "/allowed", headers={"x-deny": "no"}),
    )
    assert ok.status == 200, ok.text
    assert unflagged.status == 200, unflagged.text
    for name, resp in (
        ("GET /other", other_path),
        ("POST /allowed", post),
        ("sa other", other_sa),
        ("plaintext", plain),
        ("x-deny: yes", flagged),
    ):
        assert denied(resp), (name, resp.status, resp.text)
    # Denied requests never reach the app; the allowed ones carry the client's identity.
    arrived = mesh.app.requests[seen:]
    assert sorted((r.method, r.path) for r in arrived) == [("GET", "/allowed")] * 2
    for r in arrived:
        assert f"URI={spiffe('client')}" in r.headers.get("x-forwarded-client-cert", "")
    # The other workload did talk mTLS to the server: the 403 is the policy's, for its
    # principal, not a failed handshake.
    assert await mesh.clients["other"].handshakes_to_server() >= 1
    rbac = await mesh.server.stats("rbac.")
    denials = sum(v for k, v in rbac.items() if k.endswith("rbac.denied"))
    assert denials >= 5, rbac
    print(f"\nRBAC denials counted by the server's Envoy: {denials}")


async def test_authorization_policy_changes_apply_to_open_connections(
    processes: ProcessTracker, tmp_path: Path, short_dir: Path
) -> None:
    """Policies change while the client's sidecar holds a keep-alive mTLS connection to
    the server's sidecar. Istio's agent starts Envoy with `--drain-strategy immediate`
    (and `--drain-time-s 45`): the connections of a replaced filter chain are closed
    after their next response, so a new policy holds from the next request or so, not
    after Envoy's default gradual 600 s drain."""
    mesh = await start_secure_mesh(
        processes, tmp_path, short_dir, clients={"client": "client", "other": "other"}
    )
    # Without policies both clients get through (and keep their upstream connections).
    for client in ("client", "other"):
        await wait_for(
            lambda c=client: _is(status(mesh, c, "/allowed"), 200),
            CONVERGE_S,
            message=f"{client} -> server without policies",
        )
    # ALLOW only the client's principal on GET /allowed.
    mesh.write("authz-allow.yaml", policy_yaml("allow-client", "ALLOW", ALLOW_CLIENT_GET_ALLOWED))
    await mesh.converge("ALLOW: sa other denied", lambda: _denied(mesh.call("other", "/allowed")))
    await mesh.converge("ALLOW: GET /other denied", lambda: _denied(mesh.call("client", "/other")))
    assert await status(mesh, "client", "/allowed") == 200
    # A DENY policy added on top wins.
    mesh.write("authz-deny.yaml", policy_yaml("deny-flagged", "DENY", DENY_FLAGGED))
    flagged = {"x-deny": "yes"}
    await mesh.converge(
        "DENY added: flagged request denied",
        lambda: _denied(mesh.call("client", "/allowed", headers=flagged)),
    )
    assert await status(mesh, "client", "/allowed") == 200
    # An ALLOW policy without rules matches nothing: alone, it denies everything...
    mesh.remove("authz-deny.yaml")
    mesh.write("authz-allow.yaml", policy_yaml("allow-client", "ALLOW", None))
    await mesh.converge(
        "ALLOW without rules: all denied", lambda: _denied(mesh.call("client", "/allowed"))
    )
    # ... and `rules: [{}]` matches everything.
    mesh.write("authz-allow.yaml", policy_yaml("allow-client", "ALLOW", "  - {}\n"))
    await mesh.converge(
        "ALLOW rules [{}]: all allowed", lambda: _is(status(mesh, "other", "/x"), 200)
    )
    # Each open connection may answer one last request from the chain it was opened on
    # (Envoy's immediate drain closes it after that response), so converge per client.
    await mesh.converge(
        "ALLOW rules [{}]: client POST allowed",
        lambda: _is(status(mesh, "client", "/allowed", method="POST"), 200),
    )
    print(
        "\npolicy change -> enforced on open connections: "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in mesh.timings.items())
    )


async def _is(value: Awaitable[int], expected: int) -> bool:
    return await value == expected


async def _denied(request: Awaitable[HttpResult]) -> bool:
    return denied(await request)
