"""The peer benchmark's pure logic: CPU accounting, the shared work, sovereign's config.

Nothing here installs or starts sovereign; the benchmark itself does that.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from bench.peer import accounting, meshpilot_side, sovereign_setup, workload
from bench.peer.__main__ import FIGURES, Run, summarize
from bench.peer.accounting import Reading
from meshpilot.api.parse import parse_object
from meshpilot.config import Config


def test_per_request_subtracts_idle_and_divides_by_batch() -> None:
    before, after = Reading(t=10.0, cpu=5.0), Reading(t=12.0, cpu=6.2)
    # 1.2 s of CPU over 2 s, of which 0.1 cores x 2 s were idle: 1.0 s for 4 requests.
    assert accounting.per_request(before, after, 4, idle_rate=0.1) == pytest.approx(0.25)


def test_per_request_never_negative_and_rejects_bad_input() -> None:
    before, after = Reading(0.0, 1.0), Reading(1.0, 1.0)
    assert accounting.per_request(before, after, 1, idle_rate=0.5) == 0.0
    with pytest.raises(ValueError, match="batch size"):
        accounting.per_request(before, after, 0, 0.0)
    with pytest.raises(ValueError, match="out of order"):
        accounting.per_request(after, before, 1, 0.0)


def test_idle_rate_is_cores_used_over_the_window() -> None:
    assert accounting.idle_rate(Reading(0.0, 2.0), Reading(4.0, 2.2)) == pytest.approx(0.05)
    assert accounting.idle_rate(Reading(1.0, 2.0), Reading(1.0, 3.0)) == 0.0


def test_process_group_readings_cover_this_process() -> None:
    pids = accounting.process_tree(os.getpid())
    assert pids[0] == os.getpid()
    assert accounting.cpu_of(pids) > 0.0
    mem = accounting.memory_of([os.getpid()])
    assert mem["rss_kb"] > 0 and 0 < mem["pss_kb"] <= mem["rss_kb"]
    # A pid that no longer exists counts as nothing instead of failing the reading.
    assert accounting.cpu_of([2**22 + 1]) == 0.0


def test_spread_and_ratio() -> None:
    assert accounting.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0}
    assert accounting.ratio(10.0, 2.0) == 5.0
    assert accounting.ratio(1.0, 0.0) is None
    with pytest.raises(ValueError):
        accounting.spread([])


def test_summary_ratios_are_per_run_sovereign_over_meshpilot() -> None:
    runs = [
        SimpleNamespace(mp={"shared_cpu_s": 0.01}, sov={"shared_cpu_s": 0.5}),
        SimpleNamespace(mp={"shared_cpu_s": 0.02}, sov={"shared_cpu_s": 0.6}),
        SimpleNamespace(mp={"shared_cpu_s": 0.01}, sov={"shared_cpu_s": 0.7}),
    ]
    summary = summarize(cast(list[Run], runs))
    assert set(summary) == {key for key, _, _ in FIGURES}
    shared = summary["shared_cpu_s"]
    assert shared["ratio"] == {"median": 50.0, "min": 30.0, "max": 70.0}
    assert shared["meshpilot"]["median"] == 0.01
    assert summary["rss_mb"] == {"meshpilot": None, "sovereign": None, "ratio": None}


def test_mesh_addresses_are_distinct_and_moves_never_reuse_one() -> None:
    mesh = workload.Mesh(300, 3)
    addresses = [ip for s in mesh.services for ip in s.endpoints]
    assert len(addresses) == len(set(addresses)) == 900
    proxies = {workload.proxy_ip(k) for k in range(300)}
    vips = {s.vip for s in mesh.services}
    assert not proxies & set(addresses) and not vips & set(addresses)
    seen = set(addresses)
    for _ in range(5):
        svc, new = mesh.move(7)
        assert svc.endpoints[0] == new and new not in seen
        seen.add(new)
    # A sidecar proxy's IP is a workload's: it must be one of the endpoints.
    assert mesh.workload_ip(4) in mesh.services[4].endpoints


def test_mesh_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="services"):
        workload.Mesh(0, 3)
    with pytest.raises(ValueError, match="endpoints"):
        workload.Mesh(10, workload.MAX_ENDPOINTS + 1)


def test_meshpilot_files_parse_as_a_service_and_its_workload_entries(tmp_path: Path) -> None:
    mesh = workload.Mesh(2, 3)
    meshpilot_side.write_config(tmp_path, mesh)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc-0.yaml", "svc-1.yaml"]
    objs = workload.k8s_objects(mesh.services[1])
    parsed = [parse_object(o, "svc-1.yaml") for o in objs]
    assert all(isinstance(c, Config) for c in parsed), parsed
    assert [o["kind"] for o in objs] == ["Service"] + ["WorkloadEntry"] * 3
    assert [o["spec"]["address"] for o in objs[1:]] == mesh.services[1].endpoints


def test_sovereign_config_points_at_the_written_templates_and_source(tmp_path: Path) -> None:
    mesh = workload.Mesh(5, 3)
    path = sovereign_setup.write_config(tmp_path, mesh, refresh_rate=1)
    doc = json.loads(path.read_text())
    specs = {t["type"]: t["spec"] for t in doc["templates"]["default"]}
    assert set(specs) == set(sovereign_setup.TYPES)
    for t, spec in specs.items():
        assert spec["serialization"] == "jinja2"
        assert Path(spec["path"]).read_text() == sovereign_setup.TEMPLATES[t]
    source = doc["sources"][0]["config"]["spec"]
    instances = json.loads(Path(source["path"]).read_text())
    assert [i["endpoints"] for i in instances] == [s.endpoints for s in mesh.services]
    assert doc["matching"] == {"enabled": False}
    # Moving an endpoint rewrites the source file sovereign re-reads.
    mesh.move(2)
    sovereign_setup.write_instances(tmp_path, mesh)
    again = json.loads(Path(source["path"]).read_text())
    assert again[2]["endpoints"][0] == mesh.services[2].endpoints[0]
    assert not (tmp_path / "instances.json.tmp").exists()


def test_sovereign_templates_have_long_literals_spliced_in() -> None:
    for text in sovereign_setup.TEMPLATES.values():
        assert "HCM_TYPE_URL" not in text and '"RETRY_ON"' not in text
    assert sovereign_setup.HCM_TYPE_URL in sovereign_setup.TEMPLATES["listeners"]


def test_sovereign_env_binds_loopback_only() -> None:
    env = sovereign_setup.server_env(Path("/x/sovereign.json"), 18080, 2)
    assert env["SOVEREIGN_HOST"] == "127.0.0.1"
    assert env["SOVEREIGN_CONFIG"] == "file+json:///x/sovereign.json"
    assert env["SOVEREIGN_WORKERS"] == "2"


def test_route_names_from_rest_listeners() -> None:
    listeners: list[dict[str, Any]] = [
        {"name": "virtualOutbound", "filter_chains": [{"filters": [{"name": "tcp"}]}]},
        {
            "name": "0.0.0.0_9080",
            "filter_chains": [
                {"filters": [{"typed_config": {"rds": {"route_config_name": "9080"}}}]}
            ],
        },
    ]
    assert sovereign_setup.route_names(listeners) == ["9080"]


def test_node_ids_follow_istio_sidecar_format() -> None:
    node = sovereign_setup.node("10.1.0.4", "svc-4-pod", "bench")
    assert node["id"] == "sidecar~10.1.0.4~svc-4-pod.bench~bench.svc.cluster.local"
    assert node["metadata"] == {"NAMESPACE": "bench"}
