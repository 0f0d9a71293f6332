"""Every flag of `meshpilot agent`, `bootstrap` and `token create` names its MESHPILOT_*
variable, default and allowed values in --help, and reads that variable."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from meshpilot import envflags
from meshpilot.agent import bootstrap
from meshpilot.agent import command as agent
from meshpilot.ca import cli as ca_cli


def subparser(
    register: object, *path: str, environ: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshpilot")
    sub = parser.add_subparsers(dest="command")
    register(sub)  # type: ignore[operator]
    p = sub.choices[path[0]]
    for name in path[1:]:
        p = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    if environ is not None:
        envflags.bind_environment(p, environ)
    return p


COMMANDS = {
    "agent": (agent.register, ("agent",)),
    "bootstrap": (bootstrap.register, ("bootstrap",)),
    "token create": (ca_cli.register, ("token", "create")),
}


def flags(name: str) -> list[argparse.Action]:
    register, path = COMMANDS[name]
    p = subparser(register, *path)
    return [
        a
        for a in p._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction | argparse._VersionAction)
    ]


CASES = [(name, a.option_strings[-1]) for name in COMMANDS for a in flags(name)]


def sample(action: argparse.Action) -> tuple[str, object]:
    """A value for the variable and what the parsed flag must then be."""
    if isinstance(action, argparse._StoreTrueAction):
        return "true", True
    if isinstance(action, argparse._AppendAction):
        return "app=web,version=v2", ["app=web", "version=v2"]
    if action.choices is not None:
        last = list(action.choices)[-1]
        return str(last), last
    if action.type is Path:
        return "/tmp/from-env", Path("/tmp/from-env")
    if action.type is not None and action.type is not str:
        return "90s", 90.0
    return "from-env", "from-env"


@pytest.mark.parametrize(("command", "flag"), CASES)
def test_help_names_the_variable_and_the_default(command: str, flag: str) -> None:
    action = next(a for a in flags(command) if flag in a.option_strings)
    text = action.help or ""
    assert f"env {envflags.variable(action)}" in text, text
    assert "default" in text or "required" in text, text
    if action.choices is not None:
        assert all(str(c) in text for c in action.choices), text


@pytest.mark.parametrize(("command", "flag"), CASES)
def test_the_variable_sets_the_flag(command: str, flag: str) -> None:
    register, path = COMMANDS[command]
    action = next(a for a in flags(command) if flag in a.option_strings)
    value, expected = sample(action)
    environ = {envflags.variable(action): value}
    p = subparser(register, *path, environ=environ)
    required = [a for a in p._actions if a.required and a.option_strings and a.dest != action.dest]
    argv = [arg for a in required for arg in (a.option_strings[-1], "x")]
    args = p.parse_args(argv)
    assert getattr(args, action.dest) == expected


def test_a_flag_given_wins_over_its_variable() -> None:
    p = subparser(bootstrap.register, "bootstrap", environ={"MESHPILOT_IP": "127.0.0.9"})
    args = p.parse_args(["--name", "a", "--namespace", "b", "--ip", "127.0.0.7"])
    assert args.ip == "127.0.0.7"


def test_variables_are_named_after_the_flag() -> None:
    action = next(a for a in flags("bootstrap") if "--type" in a.option_strings)
    assert envflags.variable(action) == "MESHPILOT_TYPE"


def test_a_bad_value_names_the_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        subparser(agent.register, "agent", environ={"MESHPILOT_KEY_TYPE": "dsa"})
    assert "MESHPILOT_KEY_TYPE='dsa': expected one of ec, rsa" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        subparser(agent.register, "agent", environ={"MESHPILOT_DELTA": "maybe"})
    assert "MESHPILOT_DELTA='maybe': expected true or false" in capsys.readouterr().err
