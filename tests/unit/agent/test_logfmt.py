"""The agent's log lines are the control plane's (meshpilot/logs.py, structlog) line for
line, in both formats, with the same level filtering and the same errors."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

import pytest
import structlog

from meshpilot import logs
from meshpilot.agent import logfmt

CALLS: list[tuple[str, str, dict[str, object]]] = [
    ("info", "agent starting", {"identity": "spiffe://cluster.local/ns/a/sa/b", "n": 3}),
    ("warning", "certificate request failed", {"error": "CA said 'no'", "retry_in_s": 0.52}),
    ("error", "certificate manager failed, stopping", {"error": repr(RuntimeError("x"))}),
    ("info", "an event name longer than thirty characters", {"k": "v", "a": None}),
    ("info", "no keys", {}),
    ("debug", "below the level", {"x": 1}),
    ("info", "values", {"s": "two words", "e": "", "eq": "a=b", "t": True, "l": [1, "a"]}),
    ("info", "not json", {"obj": object.__new__(type("Thing", (), {"__repr__": lambda s: "T"}))}),
]
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    logfmt.configure("console", "debug")
    logfmt._Config.file = None


def lines_of(text: str) -> list[str]:
    return [TIMESTAMP.sub("TS", line) for line in text.splitlines()]


@pytest.mark.parametrize("fmt", ["console", "json"])
@pytest.mark.parametrize("level", ["info", "debug", "error"])
def test_lines_are_the_control_planes(
    fmt: str, level: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as m:
        theirs = io.StringIO()
        m.setattr("sys.stderr", theirs)
        logs.configure(fmt, level)
        for method, event, kw in CALLS:
            getattr(structlog.get_logger("x"), method)(event, **kw)
    with monkeypatch.context() as m:
        ours = io.StringIO()
        m.setattr("sys.stderr", ours)
        logfmt.configure(fmt, level)
        for method, event, kw in CALLS:
            getattr(logfmt.get_logger("x"), method)(event, **kw)
    assert lines_of(ours.getvalue()) == lines_of(theirs.getvalue())
    assert len(lines_of(ours.getvalue())) >= 1
    if fmt == "json":
        first = json.loads(ours.getvalue().splitlines()[0])
        assert list(first)[-3:] == ["event", "level", "timestamp"]
        assert TIMESTAMP.fullmatch(first["timestamp"])


def test_bad_format_and_level_are_refused_as_by_the_control_plane() -> None:
    for fmt, level in (("xml", "info"), ("console", "loud")):
        with pytest.raises(ValueError) as theirs:
            logs.configure(fmt, level)
        with pytest.raises(ValueError) as ours:
            logfmt.configure(fmt, level)
        assert str(ours.value) == str(theirs.value)


def test_a_terminal_gets_structlogs_colours(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    monkeypatch.setattr("sys.stderr", out)
    logfmt.configure("console", "info")
    logfmt.get_logger("x").info("agent starting", n=3)
    assert "\x1b[" in out.getvalue() and "agent starting" in out.getvalue()
