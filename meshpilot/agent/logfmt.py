"""The agent's log lines: the formats of meshpilot/logs.py, without structlog.

meshpilot/logs.py configures structlog for the control plane. structlog is ~20 modules
and ~2 MB of resident memory, which the agent beside every Envoy would carry for a few
lines an hour. This module writes the same lines as that configuration: structlog's
ConsoleRenderer without colours (timestamp, padded level and event, sorted key=value)
and its JSONRenderer (the call's keys, then event, level, timestamp). When stderr is a
terminal, the console format hands over to structlog itself, for its colours: a person
is watching, and memory does not matter.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TextIO

# structlog's ConsoleRenderer: events padded to 30 columns, levels to the longest
# level name it knows ("exception").
EVENT_WIDTH = 30
LEVEL_WIDTH = len("exception")
_QUOTED = frozenset(" \t=\r\n\"'")

Emit = Callable[[str, str, str, dict[str, object]], None]  # logger, level, event, keys


def _timestamp() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _console_value(value: object) -> str:
    if isinstance(value, str) and not (_QUOTED & set(value)):
        return value
    return repr(value)


def console_line(level: str, event: str, kw: dict[str, object], timestamp: str) -> str:
    parts = [timestamp, f"[{level:<{LEVEL_WIDTH}}]", f"{event:<{EVENT_WIDTH}}"]
    parts += [f"{k}={_console_value(kw[k])}" for k in sorted(kw)]
    return " ".join(parts).rstrip(" ")


def json_line(level: str, event: str, kw: dict[str, object], timestamp: str) -> str:
    # Not serialisable: its repr, as structlog's JSONRenderer does.
    return json.dumps({**kw, "event": event, "level": level, "timestamp": timestamp}, default=repr)


class _Config:
    min_level = logging.DEBUG
    render: Callable[[str, str, dict[str, object], str], str] = console_line
    file: TextIO | None = None  # None: the sys.stderr of the moment
    emit: Emit | None = None  # set: structlog writes instead (a terminal)


def _write(name: str, level: str, event: str, kw: dict[str, object]) -> None:
    if _Config.emit is not None:
        _Config.emit(name, level, event, kw)
        return
    line = _Config.render(level, event, kw, _timestamp())
    out = _Config.file or sys.stderr
    out.write(line + "\n")
    out.flush()


class Logger:
    """What the agent calls: `log.info("event", key=value, ...)`."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def _log(self, level: int, name: str, event: str, kw: dict[str, object]) -> None:
        if level >= _Config.min_level:
            _write(self.name, name, event, kw)

    def debug(self, event: str, **kw: object) -> None:
        self._log(logging.DEBUG, "debug", event, kw)

    def info(self, event: str, **kw: object) -> None:
        self._log(logging.INFO, "info", event, kw)

    def warning(self, event: str, **kw: object) -> None:
        self._log(logging.WARNING, "warning", event, kw)

    def error(self, event: str, **kw: object) -> None:
        self._log(logging.ERROR, "error", event, kw)


def get_logger(name: str) -> Logger:
    return Logger(name)


def configure(fmt: str = "console", level: str = "info") -> None:
    """As meshpilot.logs.configure: the format, the least severe level, to stderr."""
    lvl = logging.getLevelNamesMapping().get(level.upper())
    if lvl is None:
        raise ValueError(f"--log-level {level!r}: expected debug, info, warning or error")
    if fmt not in ("console", "json"):
        raise ValueError(f"--log-format {fmt!r}: expected console or json")
    _Config.min_level = lvl
    _Config.render = json_line if fmt == "json" else console_line
    _Config.file = sys.stderr
    _Config.emit = None
    if fmt == "console" and sys.stderr.isatty():
        _Config.emit = _structlog_emit(fmt, level)
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr)


def _structlog_emit(fmt: str, level: str) -> Emit:
    import structlog

    from meshpilot import logs

    logs.configure(fmt, level)

    def emit(name: str, level: str, event: str, kw: dict[str, object]) -> None:
        getattr(structlog.get_logger(name), level)(event, **kw)

    return emit
