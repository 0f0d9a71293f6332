"""Config errors that say where: file, document, object and field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ConfigError:
    """One rejected document or object. `field` is a path like `spec.http[0].timeout`;
    `document` counts from 1 within its file."""

    origin: str
    message: str
    document: int | None = None
    kind: str = ""
    namespace: str = ""
    name: str = ""
    field: str = ""

    @property
    def object_ref(self) -> str:
        # The name alone still helps when the kind is what is missing or wrong.
        name = f"{self.namespace}/{self.name}" if self.name else ""
        return f"{self.kind} {name}".strip()

    def __str__(self) -> str:
        where = self.origin
        if self.document is not None:
            where += f" document {self.document}"
        if self.object_ref:
            where += f" ({self.object_ref})"
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {field}{self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "document": self.document,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "field": self.field,
            "message": self.message,
        }


def field_path(loc: tuple[int | str, ...], prefix: str = "spec") -> str:
    """Pydantic error location to `spec.http[0].route[1].weight`."""
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "tagged-union")) or "[" in part:
            # Pydantic's internal validator names are noise to a user.
            continue
        else:
            out += f".{part}" if out else part
    return out
