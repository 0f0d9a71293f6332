"""One environment variable per flag, for the commands beside `serve`.

istiod and pilot-agent read nearly every setting from the environment, which is how
Kubernetes manifests and compose files configure them. meshpilot does the same:
every flag `--some-flag` of `meshpilot agent`, `meshpilot bootstrap` and
`meshpilot token create` also reads `MESHPILOT_SOME_FLAG` when it is not given on
the command line, and its help says so, with its default and allowed values.
(`meshpilot serve` has its own table in cli.py, which also checks list variables.)

A leaf module: argparse and os only, so the agent can use it without weight.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

PREFIX = "MESHPILOT_"
TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off", "")


def variable(action: argparse.Action) -> str:
    """`--proxy-log-level` -> MESHPILOT_PROXY_LOG_LEVEL (named after the flag, not its dest)."""
    flag = max(action.option_strings, key=len)
    return PREFIX + flag.lstrip("-").replace("-", "_").upper()


def bind_environment(
    parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None
) -> None:
    """Give every optional flag of `parser` its variable: defaults from `environ`
    (os.environ), and help that names the variable, the default and the choices."""
    env = os.environ if environ is None else environ
    for action in parser._actions:  # argparse has no public list of its actions
        if not action.option_strings or isinstance(
            action, argparse._HelpAction | argparse._VersionAction
        ):
            continue
        name = variable(action)
        text = env.get(name)
        if text is not None:
            _apply(parser, action, name, text)
        if f"env {name}" not in (action.help or ""):  # bound once, whoever binds again
            action.help = _help(action, name)


def _apply(parser: argparse.ArgumentParser, action: argparse.Action, name: str, text: str) -> None:
    if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        value = text.strip().lower()
        if value not in TRUE + FALSE:
            parser.error(f"{name}={text!r}: expected true or false")
        given = value in TRUE
        action.default = given if isinstance(action, argparse._StoreTrueAction) else not given
    elif isinstance(action, argparse._AppendAction):
        # Several values in one variable, separated by commas (labels, ports).
        action.default = [_convert(parser, action, name, t.strip()) for t in text.split(",") if t]
    else:
        action.default = _convert(parser, action, name, text)
    action.required = False


def _convert(
    parser: argparse.ArgumentParser, action: argparse.Action, name: str, text: str
) -> object:
    try:
        value = action.type(text) if callable(action.type) else text
    except (argparse.ArgumentTypeError, TypeError, ValueError) as e:
        parser.error(f"{name}={text!r}: {e}")
    if action.choices is not None and value not in action.choices:
        allowed = ", ".join(str(c) for c in action.choices)
        parser.error(f"{name}={text!r}: expected one of {allowed}")
    return value


def _help(action: argparse.Action, name: str) -> str:
    base = (action.help or "").rstrip()
    if base == argparse.SUPPRESS:
        return base
    parts = []
    if action.choices is not None:
        parts.append("one of " + ", ".join(str(c) for c in action.choices))
    if action.required:
        parts.append("required")
    elif isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
        parts.append(f"default: {'on' if action.default else 'off'}")
    elif isinstance(action, argparse._AppendAction):
        parts.append("repeatable; default: none")
        name += " (comma-separated)"
    elif "default" not in base:
        parts.append(f"default: {'none' if action.default in (None, '') else action.default}")
    parts.append(f"env {name}")
    # argparse formats help with %: a literal % in a default must survive that.
    tail = "; ".join(parts).replace("%", "%%")
    return f"{base} ({tail})" if base else tail
