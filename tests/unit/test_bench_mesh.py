"""The benchmark's pure logic: the generated mesh, proxy identities, visibility,
percentiles and the reconnect backoff (so the harness cannot rot unnoticed)."""

from __future__ import annotations

import random

import pytest

from bench import mesh
from bench.client import RETRY_MAX_S, backoff
from bench.run import options, percentile, table, targets
from meshpilot.api.parse import parse_object
from meshpilot.config import Config


def parsed(doc: dict) -> Config:
    cfg = parse_object(doc, "test://bench")
    assert isinstance(cfg, Config), cfg
    return cfg


def test_every_generated_object_is_accepted_by_the_parser() -> None:
    m = mesh.Mesh(services=12, namespaces=4, endpoints=3, sidecar_per_namespace=True)
    docs = [m.service(i) for i in range(12)]
    docs += [m.workload_entry(i, e) for i in range(12) for e in range(3)]
    docs += m.gateway() + m.sidecars_docs() + m.extra_service(0)
    docs += [mesh.destination_rule_doc(0), mesh.destination_rule_doc(1)]
    docs += m.fresh_namespace(0)[0]
    kinds = {parsed(d).kind for d in docs}
    assert kinds == {"Service", "WorkloadEntry", "Sidecar", "DestinationRule"}
    rules = [parsed(mesh.destination_rule_doc(r)).spec for r in (0, 1)]
    assert rules[0] != rules[1]


def test_proxies_are_sidecars_of_distinct_workload_entries() -> None:
    m = mesh.Mesh(services=10, namespaces=5, endpoints=3)
    proxies = [m.proxy(j) for j in range(30)]
    entries = {
        (d["metadata"]["namespace"], d["spec"]["address"]): d
        for d in (m.workload_entry(i, e) for i in range(10) for e in range(3))
    }
    assert len({p.ip for p in proxies}) == 30
    for p in proxies:
        entry = entries[(p.namespace, p.ip)]
        assert entry["spec"]["labels"] == p.labels
        assert entry["metadata"]["name"] == p.pod
    assert proxies[0].node_id() == "sidecar~10.0.0.0~svc-0-0.ns-0~ns-0.svc.cluster.local"
    assert {p.namespace for p in proxies} == {f"ns-{k}" for k in range(5)}


def test_empty_proxies_are_no_endpoint() -> None:
    m = mesh.Mesh(services=10, endpoints=1, sidecars=False)
    addresses = {m.workload_entry(i, 0)["spec"]["address"] for i in range(10)}
    proxies = [m.proxy(j) for j in range(20)]
    assert not addresses & {p.ip for p in proxies}
    assert all(p.namespace == mesh.NAMESPACE and not p.labels for p in proxies)


def test_moved_entries_are_never_a_proxys_own_workload() -> None:
    m = mesh.Mesh(services=100, namespaces=10, endpoints=3)
    own = {m.proxy(j).ip for j in range(200)}
    for change in range(50):
        service, endpoint = m.moved_entry(change)
        assert m.entry_address(service, endpoint) not in own
        assert m.moved_address(change + 1, service) not in own


def test_sidecar_imports_own_shared_and_five_neighbours() -> None:
    m = mesh.Mesh(services=100, namespaces=50, sidecar_per_namespace=True)
    assert m.imports(48) == [".", "istio-system", "ns-49", "ns-0", "ns-1", "ns-2", "ns-3"]
    assert m.sees("ns-48", "ns-48") and m.sees("ns-48", "ns-1")
    assert m.sees("ns-48", mesh.SHARED_NAMESPACE)
    assert not m.sees("ns-48", "ns-4") and not m.sees("ns-48", "ns-47")
    hosts = m.sidecars_docs()[48]["spec"]["egress"][0]["hosts"]
    assert hosts[:2] == ["./*", "istio-system/*"]
    # Added namespaces see what ns-0 sees, plus themselves.
    assert m.sees("fresh-3", "fresh-3") and m.sees("fresh-3", "ns-0")
    assert m.sees("fresh-3", "ns-5") and not m.sees("fresh-3", "ns-6")
    assert mesh.Mesh(namespaces=50).sees("ns-48", "ns-4")


def test_few_namespaces_import_each_other_once() -> None:
    m = mesh.Mesh(services=10, namespaces=3, sidecar_per_namespace=True)
    assert m.imports(0) == [".", "istio-system", "ns-1", "ns-2"]


def test_mesh_check_names_the_flag_to_raise() -> None:
    with pytest.raises(ValueError, match="--endpoints"):
        mesh.Mesh(services=10, endpoints=1).check(proxies=11)
    with pytest.raises(ValueError, match="--namespaces"):
        mesh.Mesh(services=10, namespaces=11).check(proxies=1)
    mesh.Mesh(services=10, endpoints=1, sidecars=False).check(proxies=1000)


def test_options_reject_more_sidecars_than_workloads(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        options(["--services", "10", "--proxies", "31"])
    assert "--endpoints" in capsys.readouterr().err
    quick = options(["--quick"])
    assert (quick.services, quick.proxies, quick.namespaces) == (100, 200, 10)


def test_nearest_rank_percentile() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0, 1.0, 2.0], 100) == 3.0
    assert percentile([7.0], 1) == 7.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_backoff_is_jittered_exponential_capped_at_five_seconds() -> None:
    rng = random.Random(1)
    first = [backoff(1, rng) for _ in range(200)]
    assert max(first) < 0.5 and min(first) >= 0
    late = [backoff(20, rng) for _ in range(200)]
    assert max(late) <= RETRY_MAX_S and max(late) > 0.5 * RETRY_MAX_S
    assert len({round(x, 6) for x in late}) > 100  # jitter: no synchronized retries


def test_targets_fail_on_missing_acks_and_nan() -> None:
    results = {
        "server": {"spawn_to_ready_s": 1.0},
        "initial_sync": {"seconds": float("nan")},
        "endpoint_convergence": {"p99_ms": 10.0, "missing_acks": 3},
        "dr_convergence": {"p99_ms": 10.0, "missing_acks": 0},
        "storm": {"error": "timed out"},
    }
    verdicts = {t["name"]: t["pass"] for t in targets(results)}
    assert verdicts == {
        "start to ready": True,
        "initial sync": False,
        "endpoint convergence p99": False,
        "DestinationRule convergence p99": True,
    }


def test_table_shows_verdicts_and_failed_phases() -> None:
    results = {
        "config": {
            "services": 10,
            "proxies": 20,
            "namespaces": 2,
            "sidecar_per_namespace": True,
            "proxies_are_sidecars": True,
            "xds": "sotw",
        },
        "machine": {"cpus": 2, "commit": "abc", "loadavg_start": 1.0, "loadavg_end": 2.0},
        "server": {
            "spawn_to_ready_s": 3.0,
            "parse_s": 0.1,
            "store_s": 0.1,
            "start_s": 0.1,
            "objects": 40,
        },
        "initial_sync": {
            "complete": False,
            "synced": 7,
            "timeout_s": 150.0,
            "seconds": float("nan"),
            "cpu_s": 1.0,
            "client_cpu_s": 0.5,
            "cpu_per_proxy_ms": 142.9,
        },
        "storm": {"error": "timed out"},
    }
    results["targets"] = targets(results)
    text = table(results)
    assert "10 services x 20 sidecars, 2 ns with Sidecars" in text
    assert "FAIL (target <= 2 s)" in text
    assert "7/20" in text and "later phases skipped" in text
    assert "142.9 ms per proxy synced" in text
    assert "storm" in text and "timed out" in text


def test_one_namespace_helpers_of_the_other_benches_keep_their_mesh() -> None:
    svc, entry = mesh.service(7), mesh.workload_entry(7)
    assert svc["metadata"] == {"name": "svc-7", "namespace": mesh.NAMESPACE}
    assert entry["spec"] == {"address": "10.0.0.7", "labels": {"app": "svc-7"}}
    assert mesh.workload_entry(7, moved=1)["spec"]["address"].startswith("10.16.")
    assert mesh.hostname(7) == "svc-7.bench.svc.cluster.local"
    assert parsed(svc).kind == "Service" and parsed(entry).kind == "WorkloadEntry"
