"""XdsCache[K, V] and its typed keys."""

from __future__ import annotations

import dataclasses

import pytest

from meshpilot.xds.cache import KEEP_CONTEXTS, EdsKey, EdsOutKey, EdsViewKey, XdsCache


def test_values_are_kept_per_context_and_only_the_newest_contexts_stay() -> None:
    cache: XdsCache[EdsKey, str] = XdsCache()
    key = EdsKey("outbound|80||a.ns.svc.cluster.local")
    assert cache.get_or_build("v1", key, lambda: "one") == "one"
    assert cache.get_or_build("v1", key, lambda: "other") == "one"
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.get("v2", key) is None
    for i in range(2, KEEP_CONTEXTS + 2):
        cache.get_or_build(f"v{i}", key, lambda: "x")
    assert cache.get("v1", key) is None
    assert len(cache) == KEEP_CONTEXTS


def test_a_full_context_builds_without_keeping() -> None:
    cache: XdsCache[EdsKey, int] = XdsCache(max_entries=2)
    for i in range(5):
        assert cache.get_or_build("v1", EdsKey(f"c{i}"), lambda i=i: i) == i
    assert len(cache) == 2


def test_carry_over_reads_typed_keys() -> None:
    cache: XdsCache[EdsKey, str] = XdsCache()
    keep, drop = EdsKey("outbound|80||a.ns"), EdsKey("outbound|80||b.ns")
    cache.get_or_build("v1", keep, lambda: "a")
    cache.get_or_build("v1", drop, lambda: "b")
    cache.carry_over("v1", "v2", lambda k: k.cluster_name.endswith("a.ns"))
    assert cache.get("v2", keep) == "a" and cache.get("v2", drop) is None


def test_keys_are_frozen_slotted_values() -> None:
    key = EdsKey.of(("eds", "outbound|80|v1|a.ns", ("dr", 3), ("priority", ("app",))))
    assert key == EdsKey("outbound|80|v1|a.ns", ("dr", 3), ("priority", ("app",)))
    assert key.uses_proxy_labels
    assert not EdsKey.of(("eds", "c", None, None)).uses_proxy_labels
    assert not hasattr(key, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        key.cluster_name = "x"  # type: ignore[misc]
    names = frozenset({"a", "b"})
    assert EdsOutKey(EdsViewKey("ns", None), names, None) == EdsOutKey(
        EdsViewKey("ns", None), frozenset({"b", "a"}), None
    )
