"""Label and field selectors with the Kubernetes query syntax.

Label selectors accept the set-based grammar of apimachinery's `labels.Parse`:
`k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`, `k>1`, `k<1`, joined by commas.
`!=` and `notin` also match objects that lack the label, as on a real server.

Field selectors accept `f=v`, `f==v`, `f!=v` joined by commas, with `\\,` `\\=` `\\\\` escapes.
Which fields may be selected on is decided by the caller (each resource supports its own set;
anything else is a 400 on a real server, and here).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_SELECTOR_LEN = 4096
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


class SelectorError(ValueError):
    """A selector that does not parse; the server answers 400 BadRequest with the message."""


Matcher = Callable[[Mapping[str, str]], bool]


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!", "gt", "lt"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        have = self.key in labels
        value = labels.get(self.key, "")
        match self.op:
            case "=" | "in":
                return have and value in self.values
            case "!=" | "notin":
                return not have or value not in self.values
            case "exists":
                return have
            case "!":
                return not have
            case "gt" | "lt":
                if not have:
                    return False
                try:
                    number = int(value)
                except ValueError:
                    return False
                bound = int(self.values[0])
                return number > bound if self.op == "gt" else number < bound
        raise AssertionError(self.op)


def _check_key(key: str, selector: str) -> None:
    prefix, _, name = key.rpartition("/")
    bad = not _NAME.match(name) or (
        "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))
    )
    if bad:
        raise SelectorError(
            f"unable to parse requirement: key: Invalid value: {key!r}: a qualified name must "
            f"consist of alphanumeric characters, '-', '_' or '.' (selector {selector!r})"
        )


def _check_value(value: str, selector: str) -> None:
    if not _VALUE.match(value):
        raise SelectorError(
            f"unable to parse requirement: values[0]: Invalid value: {value!r}: a valid label "
            f"value must be 63 characters or less, alphanumeric, '-', '_' or '.' "
            f"(selector {selector!r})"
        )


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside an `in (...)` value list."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f"unbalanced ')' in selector {text!r}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise SelectorError(f"unbalanced '(' in selector {text!r}")
    parts.append(text[start:])
    return parts


_SET_OP = re.compile(r"^(?P<key>\S+?)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_EQ_OP = re.compile(r"^(?P<key>[^=!<>\s]+)\s*(?P<op>==|=|!=|>|<)\s*(?P<value>[^=!<>\s]*)$")


def parse_label_selector(selector: str) -> list[Requirement]:
    if len(selector) > MAX_SELECTOR_LEN:
        raise SelectorError(f"labelSelector longer than {MAX_SELECTOR_LEN} characters")
    if not selector.strip():
        return []
    out: list[Requirement] = []
    for raw in _split_top_level(selector):
        part = raw.strip()
        if not part:
            raise SelectorError(f"found ',', expected: identifier (selector {selector!r})")
        if m := _SET_OP.match(part):
            values = tuple(v.strip() for v in m["values"].split(","))
            for value in values:
                _check_value(value, selector)
            _check_key(m["key"], selector)
            out.append(Requirement(m["key"], m["op"], tuple(sorted(set(values)))))
        elif m := _EQ_OP.match(part):
            op = {"==": "=", ">": "gt", "<": "lt"}.get(m["op"], m["op"])
            _check_key(m["key"], selector)
            if op in ("gt", "lt"):
                if not re.fullmatch(r"-?\d+", m["value"]):
                    raise SelectorError(
                        f"unable to parse requirement: for 'Gt', 'Lt' operators, the value must "
                        f"be an integer (selector {selector!r})"
                    )
            else:
                _check_value(m["value"], selector)
            out.append(Requirement(m["key"], op, (m["value"],)))
        elif part.startswith("!"):
            _check_key(part[1:].strip(), selector)
            out.append(Requirement(part[1:].strip(), "!"))
        elif re.fullmatch(r"\S+", part):
            _check_key(part, selector)
            out.append(Requirement(part, "exists"))
        else:
            raise SelectorError(f"unable to parse requirement {part!r} (selector {selector!r})")
    return out


def label_matcher(selector: str) -> Matcher:
    requirements = parse_label_selector(selector)
    return lambda labels: all(r.matches(labels) for r in requirements)


@dataclass(frozen=True)
class FieldTerm:
    field: str
    negate: bool
    value: str


def _unescape_split(text: str, sep: str) -> list[str]:
    parts, cur, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            cur.append("\\" + text[i + 1])
            i += 2
            continue
        if ch == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)


def parse_field_selector(selector: str) -> list[FieldTerm]:
    if len(selector) > MAX_SELECTOR_LEN:
        raise SelectorError(f"fieldSelector longer than {MAX_SELECTOR_LEN} characters")
    if not selector.strip():
        return []
    out = []
    for part in _unescape_split(selector, ","):
        # Find the first unescaped operator.
        m = re.match(r"^((?:\\.|[^\\=!])*)(!=|==|=)(.*)$", part)
        if not m:
            raise SelectorError(f"invalid selector: {selector!r}; can't understand {part!r}")
        out.append(FieldTerm(_unescape(m[1]).strip(), m[2] == "!=", _unescape(m[3])))
    return out


def field_value(obj: Mapping[str, Any], path: str) -> str:
    cur: Any = obj
    for step in path.split("."):
        if not isinstance(cur, Mapping):
            return ""
        cur = cur.get(step)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def field_matcher(
    selector: str, supported: frozenset[str], unsupported_message: Callable[[str], str]
) -> Callable[[Mapping[str, Any]], bool]:
    terms = parse_field_selector(selector)
    for term in terms:
        if term.field not in supported:
            raise SelectorError(unsupported_message(term.field))

    def match(obj: Mapping[str, Any]) -> bool:
        return all((field_value(obj, t.field) == t.value) != t.negate for t in terms)

    return match
