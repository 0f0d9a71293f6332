"""Shared pieces of the input models: camelCase aliases, durations, strictness."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic.alias_generators import to_camel

from meshpilot.durations import parse_duration


class IstioModel(BaseModel):
    """An Istio spec message: camelCase on the wire, unknown fields are errors.

    Istio's CRD schemas reject unknown fields; silently dropping a typo such as
    `subset` for `subsets` is exactly the kind of opaque failure users hate.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        str_strip_whitespace=False,
        defer_build=True,
    )


class KubeModel(BaseModel):
    """A Kubernetes object part: camelCase, unknown fields ignored (the API has many)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
        defer_build=True,
    )


def format_duration(seconds: float) -> str:
    return f"{seconds:g}s"


def check_re2(value: Any) -> str:
    """Envoy matches with RE2: lookarounds and backreferences are rejected here, not
    by a NACK from every proxy."""
    if not isinstance(value, str):
        raise ValueError(f"expected a regular expression string, got {value!r}")
    import re2  # google-re2: the engine Envoy uses

    try:
        re2.compile(value)
    except re2.error as e:
        detail = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        raise ValueError(f"invalid RE2 regex {value!r}: {detail}") from None
    return value


Regex = Annotated[str, BeforeValidator(check_re2)]
"""A regular expression in Envoy's RE2 dialect."""

Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A duration in seconds, parsed from Istio's string form."""

PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
Port = Annotated[int, Field(ge=1, le=65535)]
Labels = dict[str, str]
