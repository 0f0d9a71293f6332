"""Istio's own sample manifests must parse unchanged, with no errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.discovery.files import FileSource
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.push_context import PushContext
from tests.samples import ISTIO_SAMPLES, ISTIO_SAMPLES_ROOT

SAMPLES_ROOT = ISTIO_SAMPLES_ROOT
SAMPLES = ISTIO_SAMPLES


def sample_files() -> list[Path]:
    if not SAMPLES.is_dir():
        # Not a skip: without the corpus this whole compatibility check silently vanishes.
        raise RuntimeError(f"Istio sample corpus missing: expected it at {SAMPLES}")
    files = sorted(p for p in SAMPLES.rglob("*") if p.suffix in (".yaml", ".yml"))
    if len(files) < 20:
        raise RuntimeError(f"Istio sample corpus at {SAMPLES} looks incomplete: {len(files)}")
    return files


@pytest.mark.parametrize("path", sample_files(), ids=lambda p: str(p.relative_to(SAMPLES)))
def test_sample_parses_without_errors(path: Path) -> None:
    result = parse_text(path.read_text(), str(path))
    assert [str(e) for e in result.errors] == []
    assert result.configs or result.ignored


@pytest.mark.parametrize(
    ("relpath", "kinds", "ignored"),
    [
        ("bookinfo/platform/kube/bookinfo.yaml", {"Service": 4}, 10),
        ("bookinfo/networking/destination-rule-all.yaml", {"DestinationRule": 4}, 0),
        ("bookinfo/networking/virtual-service-all-v1.yaml", {"VirtualService": 4}, 0),
        ("bookinfo/networking/bookinfo-gateway.yaml", {"Gateway": 1, "VirtualService": 1}, 0),
        (
            "bookinfo/networking/egress-rule-google-apis.yaml",
            {"ServiceEntry": 1, "VirtualService": 1, "DestinationRule": 1},
            0,
        ),
        (
            "tcp-echo/tcp-echo-all-v1.yaml",
            {"Gateway": 1, "DestinationRule": 1, "VirtualService": 1},
            0,
        ),
        ("httpbin/httpbin.yaml", {"Service": 1}, 2),
    ],
)
def test_sample_object_counts(relpath: str, kinds: dict[str, int], ignored: int) -> None:
    path = SAMPLES / relpath
    result = parse_text(path.read_text(), str(path))
    assert Counter(c.kind for c in result.configs) == kinds
    assert result.ignored == ignored


def test_sample_details() -> None:
    path = SAMPLES / "bookinfo/networking/destination-rule-all.yaml"
    rules = {c.name: c.spec for c in parse_text(path.read_text(), str(path)).configs}
    assert [s.name for s in rules["reviews"].subsets] == ["v1", "v2", "v3"]
    assert [s.name for s in rules["ratings"].subsets] == ["v1", "v2", "v2-mysql", "v2-mysql-vm"]
    path = SAMPLES / "bookinfo/networking/virtual-service-ratings-test-delay.yaml"
    [vs] = parse_text(path.read_text(), str(path)).configs
    assert vs.spec.http[0].fault.delay.fixed_delay == 7.0
    assert vs.spec.http[0].match[0].headers["end-user"].exact == "jason"


async def test_samples_directory_loads_into_a_push_context() -> None:
    # Several samples define the same objects (alternative routings): duplicates are
    # expected here, errors of any other kind are not.
    store = ConfigStore()
    await FileSource(store, [SAMPLES]).load_initial()
    assert [e for e in store.errors() if "duplicate" not in e.message] == []
    ctx = PushContext.build(store.snapshot(), MeshConfig())
    assert "reviews.default.svc.cluster.local" in ctx.services
    assert "www.googleapis.com" in ctx.services
