"""The hostile corpus: every file in tests/fixtures/malformed has one problem.

Each is loaded through FileSource into a store. Nothing may escape as an exception;
the error must name the file, the document, the object where it is known and the
field; whatever is valid in the file is served.
"""

from __future__ import annotations

import shutil
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.discovery.files import MAX_FILE_BYTES, FileSource
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.push_context import PushContext

CORPUS = Path(__file__).parents[1] / "fixtures" / "malformed"
NS = "malformed"
WHOLE = None  # the document index of an error about the file as a whole


@dataclass(frozen=True)
class Expect:
    document: int | None
    field: str
    fragment: str
    kind: str = ""
    name: str = ""
    namespace: str = ""
    # Names of objects from this file that must be in the store.
    served: frozenset[str] = frozenset()


def obj(kind: str, name: str, field: str, fragment: str, document: int = 1, **kw: object) -> Expect:
    return Expect(document, field, fragment, kind, name, NS, **kw)  # type: ignore[arg-type]


VS, SE, DR = "VirtualService", "ServiceEntry", "DestinationRule"

EXPECTED: dict[str, Expect] = {
    # A syntax error fails the whole file, valid documents before it included: the
    # file keeps its last good objects (none here), never a half-read version.
    "yaml-syntax.yaml": Expect(WHOLE, "", "invalid YAML at line 15, column 7"),
    "json-syntax-error.json": Expect(
        WHOLE, "", "invalid JSON at line 3, column 29: Expecting property name"
    ),
    "tabs.yaml": Expect(WHOLE, "", "line 4, column 1: found character that cannot start"),
    "control-characters.yaml": Expect(WHOLE, "", "line 4, column 12: unacceptable character"),
    "python-tag.yaml": Expect(WHOLE, "", "could not determine a constructor"),
    "binary-garbage.yaml": Expect(WHOLE, "", "not valid UTF-8"),
    "not-a-mapping-list.yaml": Expect(
        1, "", "expected a mapping, got list", served=frozenset({"ok-not-a-mapping-list"})
    ),
    "not-a-mapping-scalar.yaml": Expect(
        2, "", "expected a mapping, got str", served=frozenset({"ok-not-a-mapping-scalar"})
    ),
    "unknown-kind.yaml": obj("VirtualServce", "typo-kind", "kind", "unknown kind 'VirtualServce'"),
    "missing-kind.yaml": Expect(1, "kind", "missing required field", "", "no-kind", "default"),
    "wrong-apiversion.yaml": obj(VS, "future", "apiVersion", "unsupported apiVersion"),
    "wrong-api-group.yaml": obj(
        "Gateway", "wrong-group", "apiVersion", "expected networking.istio.io/v1"
    ),
    "missing-metadata.yaml": Expect(1, "metadata", "missing required field", VS),
    "missing-name.yaml": Expect(1, "metadata.name", "missing required field", VS),
    "invalid-name-uppercase.yaml": obj(VS, "Reviews", "metadata.name", "not a valid name"),
    "invalid-namespace.yaml": Expect(
        1, "metadata.namespace", "not a valid namespace", VS, "reviews-ns", "My_Namespace"
    ),
    "labels-not-strings.yaml": obj(VS, "int-label", "metadata.labels", "map of strings"),
    "spec-not-a-mapping.yaml": obj(VS, "spec-list", "spec", "expected a mapping, got list"),
    "string-for-int.yaml": obj(
        SE, "string-port", "spec.ports[0].number", "valid integer, unable to parse"
    ),
    "int-for-list.yaml": obj(VS, "int-hosts", "spec.hosts", "valid list"),
    "unknown-field-typo.yaml": obj(DR, "typo-subsets", "spec.subset", "unknown field"),
    "missing-hosts.yaml": obj(SE, "no-hosts", "spec.hosts", "missing required field"),
    "destination-without-host.yaml": obj(
        VS, "no-dest-host", "spec.http[0].route[0].destination.host", "missing required field"
    ),
    "port-zero.yaml": obj(SE, "port-zero", "spec.ports[0].number", "greater than or equal to 1"),
    "port-70000.yaml": obj(SE, "port-big", "spec.ports[0].number", "less than or equal to 65535"),
    "negative-weight.yaml": obj(
        VS, "neg-weight", "spec.http[0].route[1].weight", "greater than or equal to 0 (got -10)"
    ),
    "duration-bare-number.yaml": obj(
        VS, "bare-timeout", "spec.http[0].timeout", "duration with a unit such as '5s'"
    ),
    "duration-garbage.yaml": obj(
        VS, "abc-timeout", "spec.http[0].timeout", "invalid duration 'abc'"
    ),
    "stringmatch-exact-and-regex.yaml": obj(
        VS, "two-matchers", "spec.http[0].match[0].uri", "only one of exact, prefix or regex"
    ),
    "bad-enum.yaml": obj(SE, "foo-resolution", "spec.resolution", "'DNS' or 'DNS_ROUND_ROBIN'"),
    "duplicate-subsets.yaml": obj(DR, "dup-subsets", "spec", "subsets[1].name 'v1' is defined"),
    "static-endpoint-without-address.yaml": obj(
        SE, "static-no-address", "spec", "endpoints[1].address is required"
    ),
    "route-without-action.yaml": obj(VS, "no-action", "spec.http[0]", "one of route, redirect"),
    "billion-laughs.yaml": obj(VS, "lol", "", "expands to over"),
    # libyaml (PyYAML >= 6.0.3) refuses the nesting while parsing, before the document
    # depth check sees it: the file fails as a whole, at the line and column.
    "deep-nesting.yaml": Expect(WHOLE, "", "line 7, column 1008: exceeded maximum nesting"),
    "list-with-bad-item.yaml": obj(
        DR,
        "list-bad",
        "items[1].spec.trafficPolicy.loadBalancer.simple",
        "(got 'SOMETIMES')",
        served=frozenset({"list-good", "list-good-too"}),
    ),
    "multi-doc-middle-bad.yaml": obj(
        VS,
        "multi-bad",
        "spec.http[0].route[0].weight",
        "(got 'lots')",
        document=2,
        served=frozenset({"ok-multi-first", "ok-multi-third"}),
    ),
}

# Odd but valid: no errors, these objects served.
VALID: dict[str, frozenset[str]] = {
    "empty.yaml": frozenset(),
    "only-comments.yaml": frozenset(),
    "valid.json": frozenset({"json-entry"}),
    "bom-and-crlf.yaml": frozenset({"ok-bom-and-crlf"}),
}

BIG = "too-big.yaml"  # generated: 5 MiB is too much to keep in the repository


def write_big(directory: Path) -> Path:
    path = directory / BIG
    head = "apiVersion: v1\nkind: Service\nmetadata: {name: huge}\nspec: {}\n"
    filler = "# " + "x" * 1021 + "\n"
    path.write_text(head + filler * (5 * 1024 * 1024 // len(filler)))
    return path


def served_names(store: ConfigStore, origin: str) -> set[str]:
    return {
        cfg.name
        for by_key in store.snapshot().by_kind.values()
        for cfg in by_key.values()
        if cfg.origin.startswith(origin + "#")
    }


def test_every_fixture_is_declared() -> None:
    on_disk = {p.name for p in CORPUS.iterdir()}
    assert on_disk == EXPECTED.keys() | VALID.keys()


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_malformed_file(name: str, tmp_path: Path) -> None:
    shutil.copy(CORPUS / name, tmp_path / name)
    origin = str(tmp_path / name)
    store = ConfigStore()
    start = time.monotonic()
    await FileSource(store, [tmp_path]).load_initial()
    assert time.monotonic() - start < 3
    expect = EXPECTED[name]
    [err] = store.errors()
    assert err.origin == origin
    got = (err.document, err.kind, err.namespace, err.name, err.field)
    assert got == (expect.document, expect.kind, expect.namespace, expect.name, expect.field)
    assert expect.fragment in err.message
    text = str(err)
    assert text.startswith(origin)
    if expect.document is not None:
        assert f"document {expect.document}" in text
    if expect.name:
        ref = f"{expect.kind} {expect.namespace}/{expect.name}".strip()
        assert f"({ref})" in text
    if expect.field:
        assert f": {expect.field}: " in text
    assert served_names(store, origin) == expect.served


@pytest.mark.parametrize("name", sorted(VALID))
async def test_odd_but_valid_file(name: str, tmp_path: Path) -> None:
    shutil.copy(CORPUS / name, tmp_path / name)
    store = ConfigStore()
    await FileSource(store, [tmp_path]).load_initial()
    assert store.errors() == []
    assert served_names(store, str(tmp_path / name)) == VALID[name]


async def test_oversized_file_is_rejected_unread(tmp_path: Path) -> None:
    path = write_big(tmp_path)
    assert path.stat().st_size > MAX_FILE_BYTES
    store = ConfigStore()
    await FileSource(store, [tmp_path]).load_initial()
    [err] = store.errors()
    assert (err.origin, err.document, err.field) == (str(path), None, "")
    assert f"over the {MAX_FILE_BYTES} byte limit" in err.message
    assert len(store.snapshot()) == 0


def test_alias_bomb_is_cheap() -> None:
    text = (CORPUS / "billion-laughs.yaml").read_text()
    tracemalloc.start()
    try:
        start = time.monotonic()
        result = parse_text(text, "bomb.yaml")
        elapsed = time.monotonic() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.configs == [] and len(result.errors) == 1
    assert elapsed < 2
    assert peak < 64 * 1024 * 1024


VALID_MESH = """\
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: malformed}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: reviews-1, namespace: malformed}
spec: {address: 10.0.0.1, labels: {app: reviews}}
"""


async def test_whole_corpus_with_a_valid_file_builds_a_push_context(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    shutil.copytree(CORPUS, conf)
    write_big(conf)
    (conf / "zz-valid.yaml").write_text(VALID_MESH)
    store = ConfigStore()
    source = FileSource(store, [conf])
    await source.load_initial()

    assert len(store.errors()) == len(EXPECTED) + 1
    assert all(e.origin.startswith(str(conf)) for e in store.errors())
    stats = source.stats()
    assert stats["files"] == len(EXPECTED) + len(VALID) + 2
    assert stats["errors"] == len(EXPECTED) + 1

    served = {c.name for by_key in store.snapshot().by_kind.values() for c in by_key.values()}
    expected = {"reviews", "reviews-1"}
    for e in EXPECTED.values():
        expected |= e.served
    for names in VALID.values():
        expected |= names
    assert served == expected

    ctx = PushContext.build(store.snapshot(), MeshConfig())
    host = "reviews.malformed.svc.cluster.local"
    assert [(e.address, e.port) for e in ctx.service_endpoints(host, 9080)] == [("10.0.0.1", 9080)]
    assert "json.example.com" in ctx.services
    assert {c.name for c in ctx.configs(DR).values()} >= {"ok-multi-first", "list-good"}
