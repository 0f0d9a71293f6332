"""The config loader's YAML shortcuts give exactly what PyYAML's safe loader gives."""

from __future__ import annotations

import datetime
from typing import Any

import pytest
import yaml

from meshpilot.api import parse

DOCUMENTS = [
    "a: 1\nb: '1'\nc: 1.5\nd: .inf\ne: 0x1F\nf: 0o17\ng: 1_000\nh: 1:30\n",
    "yes: yes\nno: no\non: off\nTrue: false\nnull: ~\nempty:\n",
    "t: 2024-01-02T03:04:05Z\nd: 2024-01-02\n",
    "base: &b {x: 1, y: [1, 2]}\nderived:\n  <<: *b\n  y: 3\n",
    "? [a, b]\n: 1\n",
    "1: one\n2.5: float key\nnull: null key\n",
    "s: !!str 123\ni: !!int '7'\nb: !!binary aGVsbG8=\n",
    "seq: !!seq [1, 2]\nm: !!map {a: b}\nset: !!set {a, b}\n",
    "'quoted: key': \"v\"\nplain key: plain value\nmulti: |\n  line\n  two\n",
    "- a\n- {b: [c, {d: e}]}\n- [[], {}]\n",
    "a: &s shared\nb: *s\nc: &m {k: v}\nd: *m\ne: &l [1]\nf: *l\n",
    "---\nkind: A\n---\n---\nkind: B\n...\n",
    "=: value key\nx: !!value 3\n",
]


def _load(text: str, loader: Any) -> list[Any]:
    return list(yaml.load_all(text, Loader=loader))


@pytest.mark.parametrize("text", DOCUMENTS)
def test_same_data_as_the_safe_loader(text: str) -> None:
    def outcome(loader: Any) -> Any:
        try:
            docs = _load(text, loader)
        except yaml.YAMLError as e:
            return ("error", type(e), str(e))
        return [yaml.safe_dump(d, sort_keys=True) for d in docs], _types(docs)

    assert outcome(parse._Loader) == outcome(yaml.CSafeLoader)


def _types(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _types(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_types(v) for v in value]
    return type(value).__name__


def test_scalar_types_are_resolved_in_every_file() -> None:
    # The memo of implicit tags is shared by all loads: a value keeps its type.
    for _ in range(2):
        (doc,) = _load("a: 1\nb: true\nc: '1'\nd: 2024-01-02\ne: null\n", parse._Loader)
        assert doc == {"a": 1, "b": True, "c": "1", "d": datetime.date(2024, 1, 2), "e": None}


def test_aliases_share_one_object() -> None:
    (doc,) = _load(DOCUMENTS[10], parse._Loader)
    assert doc["c"] is doc["d"]
    assert doc["e"] is doc["f"]


def test_recursive_alias_is_reported_not_expanded() -> None:
    result = parse.parse_text("a: &a [*a]\n", "loop.yaml")
    assert result.configs == []
    assert "expands to over" in str(result.errors[0]) or "nested" in str(result.errors[0])
