"""ConfigStore: origins, last good versions, duplicates and change keys."""

from __future__ import annotations

from structlog.testing import capture_logs

from meshpilot.api.errors import ConfigError
from meshpilot.api.parse import parse_text
from meshpilot.config import Config, ConfigKey
from meshpilot.discovery.store import ConfigStore


def dr(name: str, host: str = "h", namespace: str = "default", extra: str = "") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: {name}, namespace: {namespace}}}\n"
        f"spec: {{host: {host}{extra}}}\n"
    )


def load(store: ConfigStore, origin: str, text: str) -> frozenset[ConfigKey]:
    result = parse_text(text, origin)
    whole = any(e.document is None for e in result.errors)
    return store.set_origin(origin, result.configs, result.errors, keep_all_previous=whole)


def key(name: str, namespace: str = "default") -> ConfigKey:
    return ConfigKey("DestinationRule", namespace, name)


def host_of(store: ConfigStore, name: str) -> str | None:
    cfg = store.snapshot().get(key(name))
    return cfg.spec.host if cfg else None


def test_set_origin_reports_changed_keys_and_notifies() -> None:
    store = ConfigStore()
    heard: list[frozenset[ConfigKey]] = []
    store.subscribe(heard.append)
    assert load(store, "a.yaml", dr("a") + "---\n" + dr("b")) == {key("a"), key("b")}
    # Same content again: nothing changed, nobody is told.
    assert load(store, "a.yaml", dr("a") + "---\n" + dr("b")) == frozenset()
    assert load(store, "a.yaml", dr("a", "h2")) == {key("a"), key("b")}
    assert heard == [{key("a"), key("b")}, {key("a"), key("b")}]
    assert host_of(store, "a") == "h2"
    assert host_of(store, "b") is None


def test_snapshot_is_cached_and_immutable_per_generation() -> None:
    store = ConfigStore()
    load(store, "a.yaml", dr("a"))
    snap = store.snapshot()
    assert store.snapshot() is snap
    assert len(snap) == 1
    load(store, "a.yaml", dr("a", "other"))
    new = store.snapshot()
    assert new is not snap and new.generation > snap.generation
    assert snap.get(key("a")).spec.host == "h"  # the old snapshot did not move
    assert new.get(key("a")).spec.host == "other"
    assert dict(snap.of_kind("Gateway")) == {}


def test_invalid_object_keeps_last_good_version() -> None:
    store = ConfigStore()
    load(store, "a.yaml", dr("a") + "---\n" + dr("b"))
    changed = load(store, "a.yaml", dr("a", extra=", subset: []") + "---\n" + dr("b", "new"))
    assert changed == {key("b")}
    assert host_of(store, "a") == "h"
    [err] = store.errors()
    assert err.name == "a" and err.field == "spec.subset"
    # Fixed: the new version replaces the kept one and the error goes away.
    load(store, "a.yaml", dr("a", "fixed") + "---\n" + dr("b", "new"))
    assert host_of(store, "a") == "fixed"
    assert store.errors() == []


def test_invalid_object_never_good_is_absent() -> None:
    store = ConfigStore()
    load(store, "a.yaml", dr("a", extra=", subset: []"))
    assert len(store.snapshot()) == 0
    assert len(store.errors()) == 1


def test_unparseable_file_keeps_all_previous_objects() -> None:
    store = ConfigStore()
    load(store, "a.yaml", dr("a") + "---\n" + dr("b"))
    assert load(store, "a.yaml", "a: [\n") == frozenset()
    assert {k.name for k in store.snapshot().of_kind("DestinationRule")} == {"a", "b"}
    [err] = store.errors()
    assert err.origin == "a.yaml" and "invalid YAML" in err.message


def test_removed_object_goes_even_if_another_is_invalid() -> None:
    store = ConfigStore()
    load(store, "a.yaml", dr("a") + "---\n" + dr("b"))
    load(store, "a.yaml", dr("a", extra=", bogus: 1"))
    assert host_of(store, "a") == "h"
    assert host_of(store, "b") is None


def test_remove_origin() -> None:
    store = ConfigStore()
    load(store, "a.yaml", dr("a"))
    load(store, "b.yaml", dr("b", extra=", bogus: 1"))
    assert store.remove_origin("a.yaml") == {key("a")}
    assert store.remove_origin("a.yaml") == frozenset()
    store.remove_origin("b.yaml")
    assert store.errors() == [] and store.origins() == []


def test_duplicate_within_one_origin_first_wins() -> None:
    store = ConfigStore()
    load(store, "a.yaml", dr("a", "first") + "---\n" + dr("a", "second"))
    assert host_of(store, "a") == "first"
    [err] = store.errors()
    assert "duplicate" in err.message and err.field == "metadata.name"


def test_duplicate_across_origins_sorted_origin_wins() -> None:
    for order in (("b.yaml", "a.yaml"), ("a.yaml", "b.yaml")):
        store = ConfigStore()
        for origin in order:
            load(store, origin, dr("x", origin.replace(".yaml", "")))
        assert host_of(store, "x") == "a"
        [err] = store.errors()
        assert err.origin == "b.yaml" and "already defined in a.yaml#1" in err.message
    # Removing the winner promotes the other copy and clears the error.
    assert store.remove_origin("a.yaml") == {key("x")}
    assert host_of(store, "x") == "b"
    assert store.errors() == []


def test_same_name_in_other_namespace_or_kind_is_no_duplicate() -> None:
    store = ConfigStore()
    load(store, "a.yaml", dr("x") + "---\n" + dr("x", namespace="other"))
    assert store.errors() == []
    assert len(store.snapshot()) == 2


def test_apply_and_delete_programmatic() -> None:
    store = ConfigStore()
    cfg = Config(key=key("p"), spec=None)
    assert store.apply(cfg) == {key("p")}
    # No revision: every apply is a change.
    assert store.apply(Config(key=key("p"), spec=None)) == {key("p")}
    assert store.delete(key("p")) == {key("p")}
    assert len(store.snapshot()) == 0


def test_errors_are_logged_once_per_change() -> None:
    store = ConfigStore()
    err = ConfigError("a.yaml", "boom")
    with capture_logs() as logs:
        store.set_origin("a.yaml", [], [err])
        store.set_origin("a.yaml", [], [err])
        store.set_origin("a.yaml", [], [ConfigError("a.yaml", "bang")])
    assert [e["error"] for e in logs] == ["a.yaml: boom", "a.yaml: bang"]
    assert len(store.errors()) == 1
