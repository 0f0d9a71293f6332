"""YAML/JSON text to validated Config objects, or errors naming what is wrong and where."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from meshpilot.api.errors import ConfigError, field_path
from meshpilot.api.kinds import IGNORED_KINDS, KINDS
from meshpilot.config import Config, ConfigKey

try:  # libyaml is many times faster; fall back where it is not compiled in.
    _BaseLoader: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
except AttributeError:  # pragma: no cover
    _BaseLoader = yaml.SafeLoader

_STR_TAG = "tag:yaml.org,2002:str"
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"
# Bounds on the memo below: names, labels and numbers, not long values.
_MAX_RESOLVED = 50_000
_MAX_RESOLVED_LENGTH = 100
# Plain scalar -> tag: the same few thousand keys and values recur in every file.
_resolved: dict[str, str] = {}


class _Loader(_BaseLoader):  # type: ignore[misc,valid-type]
    """PyYAML's safe loader with two shortcuts for the common case, same result.

    libyaml parses in C but PyYAML resolves and constructs every node in Python, which
    made YAML most of the cost of loading thousands of small objects. Plain scalars'
    implicit tags (a function of the text alone: the safe loader has no path
    resolvers) are memoized; mappings with string keys, sequences and strings are
    built directly. Everything else (ints, bools, timestamps, merge keys, explicit
    tags) goes through PyYAML's constructors, and aliases still share one object.
    """

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and implicit[0] and not self.yaml_path_resolvers:
            tag = _resolved.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(value) <= _MAX_RESOLVED_LENGTH and len(_resolved) < _MAX_RESOLVED:
                    _resolved[value] = tag
            return tag
        return super().resolve(kind, value, implicit)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        tag = node.tag
        if tag == _STR_TAG and type(node) is yaml.ScalarNode:
            return node.value
        memo = self.constructed_objects
        if node in memo:
            return memo[node]
        if tag == _MAP_TAG and type(node) is yaml.MappingNode:
            pairs = node.value
            if all(k.tag == _STR_TAG and type(k) is yaml.ScalarNode for k, _ in pairs):
                out: dict[str, Any] = {}
                memo[node] = out  # before the values: an alias inside refers to it
                for k, v in pairs:
                    out[k.value] = self.construct_object(v, deep)
                return out
        elif tag == _SEQ_TAG and type(node) is yaml.SequenceNode:
            items: list[Any] = []
            memo[node] = items
            items.extend(self.construct_object(child, deep) for child in node.value)
            return items
        return super().construct_object(node, deep)


MAX_DOCUMENT_NODES = 200_000
"""Expanded size limit: a few aliases can otherwise expand to billions of nodes."""
MAX_DOCUMENT_DEPTH = 100
"""Nesting limit: later recursive steps (validation, hashing) would overflow the stack."""

_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass(slots=True)
class ParseResult:
    configs: list[Config] = field(default_factory=list)
    errors: list[ConfigError] = field(default_factory=list)
    ignored: int = 0


def parse_text(text: str, origin: str, *, syntax: Literal["yaml", "json"] = "yaml") -> ParseResult:
    """Parse a multi-document YAML text, or one JSON document; `kind: List` is unwrapped.

    JSON goes through the json module rather than YAML (a superset of it, nearly), so
    that a broken `.json` file is reported as invalid JSON, at JSON's line and column.
    """
    result = ParseResult()
    try:
        if syntax == "json":
            documents = [json.loads(text)]
        else:
            documents = list(yaml.load_all(text, Loader=_Loader))
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}"
        result.errors.append(ConfigError(origin, f"invalid JSON at {where}: {e.msg}"))
        return result
    except yaml.YAMLError as e:
        result.errors.append(ConfigError(origin, _yaml_error(e, text)))
        return result
    except RecursionError:
        name = "JSON" if syntax == "json" else "YAML"
        result.errors.append(ConfigError(origin, f"invalid {name}: nested too deeply"))
        return result
    for index, doc in enumerate(documents, start=1):  # people count documents from 1
        if doc is None:
            continue
        if too_big := _size_problem(doc):
            kind, namespace, name = _identity(doc)
            result.errors.append(ConfigError(origin, too_big, index, kind, namespace, name))
            continue
        _parse_document(doc, origin, index, result)
    return result


def _yaml_error(e: yaml.YAMLError, text: str) -> str:
    """The problem, where it is, and what the parser was in the middle of."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    line = column = None
    if mark is not None:
        line, column = mark.line + 1, mark.column + 1
    elif isinstance(e, yaml.reader.ReaderError):
        line = text.count("\n", 0, e.position) + 1
        column = e.position - text.rfind("\n", 0, e.position)
    where = f" at line {line}, column {column}" if line is not None else ""
    message = f"invalid YAML{where}: {problem}"
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and context_mark is not None and context_mark.line + 1 != line:
        message += f" ({context} started at line {context_mark.line + 1})"
    if line is not None and column is not None:
        lines = text.splitlines()
        if line <= len(lines) and lines[line - 1][column - 1 : column] == "\t":
            message += " (a tab: YAML indents with spaces only)"
    return message


def _identity(doc: Any) -> tuple[str, str, str]:
    """Kind, namespace and name of a document, where it states them plainly."""
    if not isinstance(doc, dict):
        return "", "", ""
    kind = doc.get("kind")
    metadata = doc.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    namespace = metadata.get("namespace") if isinstance(metadata, dict) else None
    if not isinstance(name, str):
        return (kind if isinstance(kind, str) else ""), "", ""
    return (
        kind if isinstance(kind, str) else "",
        namespace if isinstance(namespace, str) and namespace else "default",
        name,
    )


def _size_problem(doc: Any) -> str | None:
    budget = MAX_DOCUMENT_NODES
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            return f"document expands to over {MAX_DOCUMENT_NODES} nodes"
        if depth > MAX_DOCUMENT_DEPTH:
            return f"document is nested deeper than {MAX_DOCUMENT_DEPTH} levels"
        if isinstance(node, dict):
            stack.extend((k, depth + 1) for k in node)
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
    return None


def _parse_document(doc: Any, origin: str, index: int, result: ParseResult) -> None:
    if not isinstance(doc, dict):
        result.errors.append(
            ConfigError(origin, f"expected a mapping, got {type(doc).__name__}", index)
        )
        return
    if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
        for item_index, item in enumerate(doc["items"]):
            sub = ParseResult()
            _parse_document(item, origin, index, sub)
            result.configs.extend(sub.configs)
            result.ignored += sub.ignored
            result.errors.extend(_with_field_prefix(e, f"items[{item_index}]") for e in sub.errors)
        return
    try:
        parsed = parse_object(doc, origin, index)
    except _Ignored:
        result.ignored += 1
        return
    if isinstance(parsed, ConfigError):
        result.errors.append(parsed)
    else:
        result.configs.append(parsed)


def _with_field_prefix(err: ConfigError, prefix: str) -> ConfigError:
    return ConfigError(
        err.origin,
        err.message,
        err.document,
        err.kind,
        err.namespace,
        err.name,
        f"{prefix}.{err.field}" if err.field else prefix,
    )


class _Ignored(Exception):
    pass


def parse_object(
    doc: dict[str, Any], origin: str, index: int | None = None
) -> Config | ConfigError:
    """Validate one object (a decoded YAML/JSON mapping) into a Config."""
    kind = doc.get("kind")
    api_version = doc.get("apiVersion")
    # Name the object in errors about its kind or apiVersion too, when it is plain.
    _, known_ns, known_name = _identity(doc)

    def error(
        message: str, fld: str = "", ns: str = known_ns, name: str = known_name
    ) -> ConfigError:
        return ConfigError(origin, message, index, str(kind or ""), ns, name, fld)

    if not isinstance(kind, str) or not kind:
        return error("missing required field", "kind")
    if not isinstance(api_version, str) or not api_version:
        return error("missing required field", "apiVersion")
    info = KINDS.get(kind)
    if info is None:
        if kind in IGNORED_KINDS:
            raise _Ignored
        known = ", ".join(sorted(KINDS))
        return error(f"unknown kind {kind!r} (apiVersion {api_version}); known: {known}", "kind")
    group, _, version = api_version.rpartition("/")
    if group != info.group or version not in info.versions:
        expected = " or ".join(
            f"{info.group}/{v}" if info.group else v for v in sorted(info.versions)
        )
        return error(f"unsupported apiVersion {api_version!r}, expected {expected}", "apiVersion")

    metadata = doc.get("metadata")
    if not isinstance(metadata, dict):
        return error("missing required field (a mapping with name)", "metadata")
    name = metadata.get("name")
    namespace = metadata.get("namespace") or "default"
    if not isinstance(name, str) or not name:
        return error("missing required field", "metadata.name")
    if not isinstance(namespace, str) or not _DNS1123_LABEL.match(namespace):
        return error(
            f"{namespace!r} is not a valid namespace (lowercase DNS label)",
            "metadata.namespace",
            ns=str(namespace),
            name=name,
        )
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        return error(
            f"{name!r} is not a valid name (lowercase letters, digits, '-' and '.')",
            "metadata.name",
            ns=namespace,
            name=name,
        )
    labels = metadata.get("labels") or {}
    annotations = metadata.get("annotations") or {}
    for fname, mapping in (("labels", labels), ("annotations", annotations)):
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
        ):
            return error("expected a map of strings", f"metadata.{fname}", namespace, name)

    spec = doc.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, dict):
        return error(f"expected a mapping, got {type(spec).__name__}", "spec", namespace, name)
    try:
        model = info.spec_model.model_validate(spec)
    except ValidationError as e:
        # A typo shows up as an unknown field plus, often, a missing one: the unknown
        # one is what the user wrote, so name it.
        first = min(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        extra = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        return error(_message(first) + extra, field_path(tuple(first["loc"])), namespace, name)
    except (ValueError, TypeError, RecursionError) as e:
        return error(str(e), "spec", namespace, name)

    return Config(
        key=ConfigKey(kind, namespace, name),
        spec=model,
        labels=dict(labels),
        annotations=dict(annotations),
        creation_timestamp=_timestamp(metadata.get("creationTimestamp")),
        origin=origin if index is None else f"{origin}#{index}",
        revision=_revision(spec, labels, annotations),
    )


def _message(err: Any) -> str:
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        return "unknown field"
    if err.get("type") == "missing":
        return "missing required field"
    value = err.get("input")
    if (
        err.get("type") not in ("model_type",)
        and not isinstance(value, dict | list)
        and repr(value) not in msg
    ):
        return f"{msg} (got {value!r})"
    return msg


def _timestamp(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def _revision(spec: Any, labels: Any, annotations: Any) -> str:
    blob = json.dumps([spec, labels, annotations], sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()
