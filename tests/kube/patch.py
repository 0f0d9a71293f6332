"""JSON merge patch (RFC 7386) and JSON patch (RFC 6902), the patch types every
kube-apiserver accepts for every kind.
"""

from __future__ import annotations

import copy
from typing import Any


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class PatchError(Exception):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, dict):
            if token not in doc:
                raise PatchError(f"missing path component {token!r}")
            doc = doc[token]
        elif isinstance(doc, list):
            if not token.isdigit() or int(token) >= len(doc):
                raise PatchError(f"index {token!r} out of range")
            doc = doc[int(token)]
        else:
            raise PatchError(f"cannot descend into {token!r}")
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        index = len(parent) if last == "-" else int(last) if last.isdigit() else -1
        if not 0 <= index <= len(parent):
            raise PatchError(f"index {last!r} out of range")
        parent.insert(index, value)
    else:
        raise PatchError(f"cannot add at {last!r}")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        return parent.pop(last)
    if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        return parent.pop(int(last))
    raise PatchError(f"cannot remove missing {last!r}")


def json_patch(doc: Any, operations: Any) -> Any:
    """RFC 6902 JSON patch."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"malformed operation {op!r}")
        tokens = _pointer(op["path"])
        match op["op"]:
            case "add":
                doc = _add(doc, tokens, copy.deepcopy(op.get("value")))
            case "remove":
                _remove(doc, tokens)
            case "replace":
                _walk(doc, tokens)
                if tokens:
                    _remove(doc, tokens)
                doc = _add(doc, tokens, copy.deepcopy(op.get("value")))
            case "move" | "copy":
                source = _pointer(op.get("from", ""))
                value = _walk(doc, source)
                if op["op"] == "move":
                    _remove(doc, source)
                doc = _add(doc, tokens, copy.deepcopy(value))
            case "test":
                if _walk(doc, tokens) != op.get("value"):
                    raise PatchError(f"testing value {op['path']} failed")
            case other:
                raise PatchError(f"unknown operation {other!r}")
    return doc
