"""The config gauges of `meshpilot serve` follow the store: errors and objects, by kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshpilot.api.parse import parse_text
from meshpilot.monitoring import metrics
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings


def dr(name: str, host: str = "h") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: {name}}}\nspec: {{host: {host}}}\n"
    )


BAD_DR = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: bad}\n"
BAD_DR += "spec: {hots: h}\n"


def errors_gauge() -> float:
    return sum(
        s.value
        for m in metrics.REGISTRY.collect()
        if m.name == "meshpilot_config_errors_current"
        for s in m.samples
    )


def gauge(name: str, label: str, value: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, {label: value})


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    d = tmp_path / "conf"
    d.mkdir()
    return d


async def test_errors_gauge_counts_rejected_objects_as_files_load_are_fixed_and_deleted(
    conf: Path,
) -> None:
    server = MeshServer(Settings(config_dirs=[conf]))
    assert server.files is not None
    # A file whose only object is rejected changes no object in the store.
    (conf / "bad.yaml").write_text(BAD_DR)
    await server.files.load_initial()
    assert len(server.store.errors()) == 1
    assert errors_gauge() == 1
    assert gauge("meshpilot_config_errors_current", "kind", "DestinationRule") == 1

    (conf / "bad.yaml").write_text(dr("bad"))
    await server.files.apply_changes([str(conf / "bad.yaml")])
    assert errors_gauge() == 0

    (conf / "bad.yaml").write_text(BAD_DR)
    await server.files.apply_changes([str(conf / "bad.yaml")])
    # The last good version stays, and the rejected edit is counted.
    assert errors_gauge() == 1

    (conf / "bad.yaml").unlink()
    await server.files.apply_changes([str(conf / "bad.yaml")])
    assert errors_gauge() == 0


async def test_errors_gauge_counts_parse_errors_and_duplicates(conf: Path) -> None:
    server = MeshServer(Settings(config_dirs=[conf]))
    assert server.files is not None
    (conf / "broken.yaml").write_text("kind: [unclosed\n")
    (conf / "a.yaml").write_text(dr("same"))
    (conf / "b.yaml").write_text(dr("same", "other"))
    await server.files.load_initial()
    assert len(server.store.errors()) == 2
    assert errors_gauge() == 2
    assert gauge("meshpilot_config_errors_current", "kind", "unknown") == 1

    (conf / "broken.yaml").unlink()
    (conf / "b.yaml").unlink()
    await server.files.apply_changes([str(conf / "broken.yaml"), str(conf / "b.yaml")])
    assert errors_gauge() == 0


async def test_objects_gauge_drops_to_zero_when_the_last_object_of_a_kind_goes(
    conf: Path,
) -> None:
    server = MeshServer(Settings(config_dirs=[conf]))
    assert server.files is not None
    (conf / "a.yaml").write_text(dr("a"))
    await server.files.load_initial()
    assert gauge("pilot_k8s_cfg_events_current", "type", "DestinationRule") == 1
    (conf / "a.yaml").unlink()
    await server.files.apply_changes([str(conf / "a.yaml")])
    assert gauge("pilot_k8s_cfg_events_current", "type", "DestinationRule") == 0


def test_error_labels_are_bounded_to_known_kinds() -> None:
    store = MeshServer(Settings()).store
    result = parse_text("apiVersion: v9\nkind: Made-Up-1\nmetadata: {name: x}\n", "x.yaml")
    store.set_origin("x.yaml", result.configs, result.errors)
    assert gauge("meshpilot_config_errors_current", "kind", "Made-Up-1") is None
    assert gauge("meshpilot_config_errors_current", "kind", "unknown") == 1
