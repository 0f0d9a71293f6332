"""End to end: real Envoys fed by meshpilot over SotW and Delta ADS, and the `make run` demo."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from envoy.config.listener.v3 import listener_pb2

from meshpilot.xds import typeurls
from meshpilot.xds.resources import Generated, Resource
from tests.e2e.harness import (
    DemoServer,
    EnvoyProcess,
    ProcessTracker,
    free_port,
    http_get,
    unique_loopback_ip,
    wait_for,
)
from tests.e2e.mesh import Mesh, egress_sidecar_yaml, service_yaml, workload_yaml

REVIEWS_CLUSTER = "outbound|9080||reviews.default.svc.cluster.local"


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    config = tmp_path / "config"
    config.mkdir()
    m = Mesh(config, debounce_after=0.05)
    try:
        yield m
    finally:
        await m.stop()


async def _client_envoy(
    processes: ProcessTracker, mesh: Mesh, client_ip: str, *, delta: bool
) -> EnvoyProcess:
    return await processes.envoy(
        name="client",
        namespace="default",
        ip=client_ip,
        labels={"app": "client"},
        xds_address=mesh.xds_address,
        delta=delta,
    )


async def _reviews_answer(client_ip: str) -> tuple[int, str]:
    try:
        resp = await http_get(
            f"http://{client_ip}:9080/hello", headers={"Host": "reviews:9080"}, timeout=2
        )
    except (OSError, TimeoutError) as e:
        return 0, repr(e)
    return resp.status, resp.text


async def _served_by(backend: DemoServer, before: int, client_ip: str) -> bool:
    status, _ = await _reviews_answer(client_ip)
    return status == 200 and len(backend.requests) > before


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_envoy_routes_and_follows_config_edits(
    processes: ProcessTracker, mesh: Mesh, delta: bool
) -> None:
    client_ip, backend_ip, backend2_ip = (unique_loopback_ip() for _ in range(3))
    backend = await processes.demo_http(backend_ip, 9080, service="reviews", version="v1")
    backend2 = await processes.demo_http(backend2_ip, 9080, service="reviews", version="v2")
    backend2_alt_port = await processes.demo_http(
        backend2_ip, free_port(backend2_ip), service="reviews", version="v2-alt"
    )
    mesh.write("reviews.yaml", service_yaml("reviews"))
    mesh.write("reviews-v1.yaml", workload_yaml("reviews-v1", "reviews", backend_ip))
    mesh.write("client.yaml", egress_sidecar_yaml("client", "client", client_ip))
    await mesh.start()
    envoy = await _client_envoy(processes, mesh, client_ip, delta=delta)
    await envoy.wait_live()
    await mesh.wait_synced(envoy)

    # Envoy holds what the config directory says: the bound egress listener and the
    # EDS cluster with the WorkloadEntry's address.
    assert f"{client_ip}_9080" in await envoy.listeners()
    assert await envoy.cluster_hosts(REVIEWS_CLUSTER) == [f"{backend_ip}:9080"]
    mode = "DELTA_GRPC" if delta else "GRPC"
    assert envoy.bootstrap["dynamic_resources"]["ads_config"]["api_type"] == mode

    status, body = await _reviews_answer(client_ip)
    assert status == 200, body
    assert backend.requests[-1].host == "reviews:9080"
    assert backend.requests[-1].path == "/hello"

    # Moving the WorkloadEntry to another address reroutes within a second.
    t0 = time.monotonic()
    mesh.write("reviews-v1.yaml", workload_yaml("reviews-v1", "reviews", backend2_ip))
    n2 = len(backend2.requests)
    await wait_for(lambda: _served_by(backend2, n2, client_ip), 1.0, interval=0.02)
    moved_after = time.monotonic() - t0

    # And to another port.
    port = backend2_alt_port.port
    mesh.write("reviews-v1.yaml", workload_yaml("reviews-v1", "reviews", backend2_ip, port=port))
    n3 = len(backend2_alt_port.requests)
    await wait_for(lambda: _served_by(backend2_alt_port, n3, client_ip), 1.0, interval=0.02)

    # Deleting it stops traffic: Envoy answers 503 (no healthy upstream), no backend sees it.
    (mesh.config_dir / "reviews-v1.yaml").unlink()
    await envoy.wait_for(lambda: _no_hosts(envoy), 1.0, message="the endpoint to go")
    counts = [len(b.requests) for b in (backend, backend2, backend2_alt_port)]
    status, _ = await _reviews_answer(client_ip)
    assert status == 503
    assert [len(b.requests) for b in (backend, backend2, backend2_alt_port)] == counts
    print(f"reroute after WorkloadEntry edit: {moved_after * 1000:.0f} ms")


async def _no_hosts(envoy: EnvoyProcess) -> bool:
    return await envoy.cluster_hosts(REVIEWS_CLUSTER) == []


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_nacked_listener_is_reported_not_resent_and_last_good_config_routes(
    processes: ProcessTracker, mesh: Mesh, delta: bool
) -> None:
    client_ip, backend_ip = unique_loopback_ip(), unique_loopback_ip()
    backend = await processes.demo_http(backend_ip, 9080, service="reviews")
    mesh.write("reviews.yaml", service_yaml("reviews"))
    mesh.write("reviews-v1.yaml", workload_yaml("reviews-v1", "reviews", backend_ip))
    mesh.write("client.yaml", egress_sidecar_yaml("client", "client", client_ip))
    await mesh.start()
    envoy = await _client_envoy(processes, mesh, client_ip, delta=delta)
    await envoy.wait_live()
    await mesh.wait_synced(envoy)

    # Inject a listener Envoy must reject (a listener needs an address).
    real_generate = mesh.server.generator.generate
    bad = Resource.of("bad-listener", listener_pb2.Listener(name="bad-listener"), typeurls.LISTENER)

    def generate_with_bad_listener(type_url, proxy, push, names, request):  # type: ignore[no-untyped-def]
        out = real_generate(type_url, proxy, push, names, request)
        if type_url == typeurls.LISTENER and out is not None:
            return Generated((*out.resources, bad), out.complete)
        return out

    mesh.server.generator.generate = generate_with_bad_listener  # type: ignore[method-assign]
    mesh.server.discovery.generator = mesh.server.generator
    mesh.write("ratings.yaml", service_yaml("ratings"))  # any full push

    entry = await envoy.wait_for(
        lambda: _nacked(mesh, envoy.name), 5.0, message="the listener NACK in /debug/syncz"
    )
    assert "bad-listener" in entry["listener_nack"]
    nonce = entry["listener_sent"]
    pushes = mesh.server.discovery.connections_for(envoy.name)[0].watched[typeurls.LISTENER]
    await asyncio.sleep(1.5)
    after = await mesh.syncz(envoy.name)
    assert after["listener_sent"] == nonce, "the rejected listeners were sent again"
    assert pushes.nacks == 1
    assert await envoy.stat("listener_manager.lds.update_rejected") >= 1

    # The last good listeners keep routing.
    status, body = await _reviews_answer(client_ip)
    assert status == 200, body
    assert backend.requests

    _, metrics_text = await mesh.get("/metrics")
    assert 'pilot_total_xds_rejects_total{type="lds"}' in metrics_text

    # A fixed config is sent and ACKed, which clears the NACK.
    mesh.server.generator.generate = real_generate  # type: ignore[method-assign]
    mesh.write("details.yaml", service_yaml("details"))
    await mesh.wait_synced(envoy)
    assert (await mesh.syncz(envoy.name))["listener_nack"] == ""


async def _nacked(mesh: Mesh, proxy_id: str) -> dict | None:
    entry = dict(await mesh.syncz(proxy_id))
    return entry if entry.get("listener_nack") else None


async def test_ready_metrics_configz_and_config_dump(processes: ProcessTracker, mesh: Mesh) -> None:
    client_ip, backend_ip = unique_loopback_ip(), unique_loopback_ip()
    await processes.demo_http(backend_ip, 9080, service="reviews")
    mesh.write("reviews.yaml", service_yaml("reviews"))
    mesh.write("reviews-v1.yaml", workload_yaml("reviews-v1", "reviews", backend_ip))
    mesh.write("client.yaml", egress_sidecar_yaml("client", "client", client_ip))
    broken = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad}\n"
    mesh.write("broken.yaml", broken + "spec: {hosts: [a.example.com], resolution: FOO}\n")
    # Before start the monitoring port is not even bound; after start /ready is 200.
    await mesh.start()
    status, text = await mesh.get("/ready")
    assert status == 200, text
    envoy = await _client_envoy(processes, mesh, client_ip, delta=False)
    await envoy.wait_live()
    await mesh.wait_synced(envoy)

    status, text = await mesh.get("/metrics")
    assert status == 200
    for name in (
        "pilot_xds{",
        "pilot_xds_pushes_total{",
        "pilot_xds_push_time_bucket",
        "pilot_proxy_convergence_time_bucket",
        "pilot_debounce_time_bucket",
        "pilot_total_xds_rejects",
        'meshpilot_config_errors_current{kind="ServiceEntry"} 1.0',
        'meshpilot_config_errors_total{kind="ServiceEntry"} 1.0',
    ):
        assert name in text, f"{name} missing from /metrics"

    status, configz = await mesh.get("/debug/configz")
    assert status == 200
    (err,) = configz["errors"]
    assert err["origin"].endswith("broken.yaml")
    assert err["field"] == "spec.resolution"
    assert "FOO" in err["message"]
    kinds = {(o["kind"], o["name"]) for o in configz["objects"]}
    assert ("Service", "reviews") in kinds and ("ServiceEntry", "bad") not in kinds

    status, dump = await mesh.get(f"/debug/config_dump?proxyID={envoy.name}")
    assert status == 200
    by_type = {c["@type"].rsplit(".", 1)[-1]: c for c in dump["configs"]}
    clusters = [
        c["cluster"]["name"] for c in by_type["ClustersConfigDump"]["dynamic_active_clusters"]
    ]
    assert REVIEWS_CLUSTER in clusters
    # What meshpilot says it sent is what Envoy has.
    envoy_clusters = await envoy.clusters()
    assert set(clusters) <= set(envoy_clusters)
    status, _ = await mesh.get("/debug/config_dump?proxyID=nobody")
    assert status == 404

    syncz = await mesh.syncz(envoy.name)
    assert syncz["proxy_type"] == "sidecar"
    for key in ("cluster_sent", "cluster_acked", "listener_sent", "listener_acked",
                "route_sent", "route_acked", "endpoint_sent", "endpoint_acked"):  # fmt: skip
        assert syncz[key], key


async def test_make_run_demo_shows_traffic_through_the_mesh(
    processes: ProcessTracker, tmp_path: Path
) -> None:
    """`make run`'s program, in its non-interactive mode, on free control-plane ports."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = await processes.spawn(
        _demo_argv("--check", "--xds-port", str(free_port()),
                   "--monitoring-port", str(free_port()), log_dir=tmp_path / "logs"),
        ready_line=None, name="demo", env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip
    await wait_for(lambda: not proc.running, 60, message="the demo to finish")
    out = proc.log_text()
    assert proc.returncode == 0, out
    assert "all 4 sidecars synced" in out
    assert "-> reviews v" in out and "-> ratings v1" in out
    assert "proxyID=productpage-v1.default" in out
    assert list(tmp.iterdir()) == [], "the demo left its temporary directory behind"


def _demo_argv(*extra: str, log_dir: Path) -> list[str]:
    return [sys.executable, "-m", "meshpilot.demo", "--log-dir", str(log_dir),
            "--admin-base-port", str(free_port()), *extra]  # fmt: skip


async def test_make_run_demo_names_the_busy_port_and_log_and_removes_its_temp_dir(
    processes: ProcessTracker, tmp_path: Path
) -> None:
    """A port held by someone else: the demo says which one and where the log is."""
    tmp, logs = tmp_path / "tmp", tmp_path / "logs"
    tmp.mkdir()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        proc = await processes.spawn(
            _demo_argv("--check", "--xds-port", str(free_port()),
                       "--monitoring-port", str(port), log_dir=logs),
            ready_line=None, name="demo", env={**os.environ, "TMPDIR": str(tmp)},
        )  # fmt: skip
        await wait_for(lambda: not proc.running, 30, message="the demo to fail")
    out = proc.log_text()
    assert proc.returncode != 0, out
    assert f"127.0.0.1:{port}" in out
    assert "in use" in out
    assert str(logs / "meshpilot.log") in out
    assert (logs / "meshpilot.log").is_file()
    assert list(tmp.iterdir()) == [], "the demo left its temporary directory behind"


async def test_make_run_demo_ctrl_c_stops_children_and_removes_its_temp_dir(
    processes: ProcessTracker, tmp_path: Path
) -> None:
    tmp, logs = tmp_path / "tmp", tmp_path / "logs"
    tmp.mkdir()
    proc = await processes.spawn(
        _demo_argv("--xds-port", str(free_port()), "--monitoring-port", str(free_port()),
                   log_dir=logs),
        ready_line=None, name="demo", env={**os.environ, "TMPDIR": str(tmp)},
    )  # fmt: skip
    # Interrupt mid-setup, once the control plane runs and the temp dir exists.
    await wait_for(lambda: (logs / "meshpilot.log").exists() and any(tmp.iterdir()), 30)
    serve_log = logs / "meshpilot.log"
    await wait_for(lambda: "meshpilot serving" in serve_log.read_text(), 20)
    os.kill(proc.pid, signal.SIGINT)
    await wait_for(lambda: not proc.running, 20, message="the demo to stop on SIGINT")
    out = proc.log_text()
    assert proc.returncode == 130, out
    assert "stopping..." in out
    assert list(tmp.iterdir()) == [], "the demo left its temporary directory behind"
