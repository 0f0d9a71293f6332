"""`meshpilot serve` refuses bad flags and files with a clear message and a non-zero exit."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

import meshpilot
from meshpilot import cli
from meshpilot.serve import MeshServer
from meshpilot.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "meshpilot", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_missing_config_dir_is_an_error() -> None:
    out = _serve("--config-dir", "/nonexistent/mesh")
    assert out.returncode == 2
    assert "--config-dir /nonexistent/mesh: not a directory" in out.stderr


def test_bad_duration_is_an_error() -> None:
    out = _serve("--debounce-after", "soon")
    assert out.returncode == 2
    assert "invalid duration 'soon'" in out.stderr


def test_bad_address_is_an_error() -> None:
    out = _serve("--xds-address", "localhost")
    assert out.returncode == 2
    assert "expected HOST:PORT" in out.stderr


def test_invalid_mesh_config_names_file_and_field(tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text("outboundTrafficPolicy: {mode: SOMETIMES}\n")
    out = _serve("--mesh-config", str(mesh))
    assert out.returncode == 2
    assert f"{mesh}: outboundTrafficPolicy.mode" in out.stderr
    assert "Traceback" not in out.stderr


def test_busy_xds_port_fails_instead_of_sharing_it(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _serve(
            "--config-dir",
            str(tmp_path),
            "--xds-address",
            f"127.0.0.1:{port}",
            "--monitoring-address",
            "127.0.0.1:0",
        )
    assert out.returncode == 1
    assert f"xDS server cannot listen on 127.0.0.1:{port}" in out.stderr


# --- flags, environment and help ----------------------------------------------------------


def serve_actions() -> list[argparse.Action]:
    parser = cli.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    serve = sub.choices["serve"]
    return [a for a in serve._actions if not isinstance(a, argparse._HelpAction)]


# For every serve flag: a value set through the environment, and the Settings field it
# must arrive in with that value. A new flag fails test_every_flag_is_covered until it
# is added here.
ENV_CASES: dict[str, tuple[str, str, object]] = {
    "config_dir": (f"/tmp/a{os.pathsep}/tmp/b", "config_dirs", [Path("/tmp/a"), Path("/tmp/b")]),
    "mesh_config": ("/tmp/mesh.yaml", "mesh_config", Path("/tmp/mesh.yaml")),
    "xds_address": ("127.0.0.2:25010", "xds_address", "127.0.0.2:25010"),
    "monitoring_address": ("127.0.0.2:25014", "monitoring_address", "127.0.0.2:25014"),
    "debounce_after": ("250ms", "debounce_after", 0.25),
    "debounce_max": ("3s", "debounce_max", 3.0),
    "log_format": ("json", "log_format", "json"),
    "log_level": ("DEBUG", "log_level", "debug"),
    "ca_dir": ("/tmp/ca", "ca_dir", Path("/tmp/ca")),
    "trust_domain": ("example.org", "trust_domain", "example.org"),
    "secure_xds_address": ("127.0.0.2:25012", "secure_xds_address", "127.0.0.2:25012"),
    "workload_cert_ttl": ("2h", "workload_cert_ttl", 7200.0),
    "max_workload_cert_ttl": ("30d", "max_workload_cert_ttl", 30 * 86400.0),
    "kubeconfig": ("/tmp/kubeconfig", "kubeconfig", Path("/tmp/kubeconfig")),
    "context": ("kind-mesh", "kube_context", "kind-mesh"),
    "in_cluster": ("true", "in_cluster", True),
    "cluster_id": ("east", "cluster_id", "east"),
    "system_namespace": ("mesh-system", "system_namespace", "mesh-system"),
    "injection_address": ("127.0.0.2:25017", "injection_address", "127.0.0.2:25017"),
    "injection_template": ("/tmp/t.yaml", "injection_template", Path("/tmp/t.yaml")),
    "lease_duration": ("4s", "lease_duration", 4.0),
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MESHPILOT_"):
            monkeypatch.delenv(name)


def test_every_flag_is_covered() -> None:
    assert {a.dest for a in serve_actions()} == ENV_CASES.keys()


@pytest.mark.parametrize("dest", sorted(ENV_CASES))
def test_every_serve_flag_reads_its_environment_variable(
    dest: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    text, field, expected = ENV_CASES[dest]
    default = getattr(cli.serve_settings(cli.parse(["serve"])[1]), field)
    assert default != expected  # the case proves something
    monkeypatch.setenv(f"MESHPILOT_{dest.upper()}", text)
    settings = cli.serve_settings(cli.parse(["serve"])[1])
    assert getattr(settings, field) == expected


def test_a_flag_given_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHPILOT_CONFIG_DIR", "/tmp/env")
    monkeypatch.setenv("MESHPILOT_XDS_ADDRESS", "127.0.0.2:1")
    args = cli.parse(["serve", "--config-dir", "/tmp/flag", "--xds-address", "127.0.0.3:2"])[1]
    settings = cli.serve_settings(args)
    assert settings.config_dirs == [Path("/tmp/flag")]
    assert settings.xds_address == "127.0.0.3:2"


def test_a_bad_environment_value_names_the_variable() -> None:
    env = dict(os.environ, MESHPILOT_DEBOUNCE_AFTER="soon", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-m", "meshpilot", "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert out.returncode == 2
    assert "MESHPILOT_DEBOUNCE_AFTER='soon': invalid duration 'soon'" in out.stderr


def test_config_dir_from_the_environment_is_served(tmp_path: Path) -> None:
    (tmp_path / "dr.yaml").write_text(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        "metadata: {name: from-env}\nspec: {host: h}\n"
    )
    env = dict(os.environ, MESHPILOT_CONFIG_DIR=str(tmp_path), MESHPILOT_LOG_FORMAT="json")
    env |= {"MESHPILOT_XDS_ADDRESS": "127.0.0.1:0", "MESHPILOT_MONITORING_ADDRESS": "127.0.0.1:0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshpilot", "serve"],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if '"meshpilot serving"' in line:
                assert json.loads(line)["objects"] == 1
                break
        else:
            raise AssertionError("meshpilot serve exited before serving")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)


@pytest.mark.parametrize("dest", sorted(ENV_CASES))
def test_every_serve_flag_help_names_default_and_variable(dest: str) -> None:
    [action] = [a for a in serve_actions() if a.dest == dest]
    text = action.help or ""
    assert f"MESHPILOT_{dest.upper()}" in text
    assert "default: " in text
    if action.choices:
        assert all(choice in text for choice in action.choices)


def test_in_cluster_is_a_switch_and_its_variable_takes_true_or_false(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert cli.serve_settings(cli.parse(["serve", "--in-cluster"])[1]).in_cluster is True
    monkeypatch.setenv("MESHPILOT_IN_CLUSTER", "false")
    assert cli.serve_settings(cli.parse(["serve"])[1]).in_cluster is False


def test_kubeconfig_and_in_cluster_exclude_each_other(tmp_path: Path) -> None:
    out = _serve("--kubeconfig", str(tmp_path / "kc"), "--in-cluster")
    assert out.returncode == 2
    assert "--kubeconfig and --in-cluster exclude each other" in out.stderr


def test_a_bad_system_namespace_is_named() -> None:
    out = _serve("--in-cluster", "--system-namespace", "Istio_System")
    assert out.returncode == 2
    assert "--system-namespace 'Istio_System': expected a namespace name" in out.stderr


def test_help_shows_the_separator_of_list_variables() -> None:
    [action] = [a for a in serve_actions() if a.dest == "config_dir"]
    assert f"several separated by {os.pathsep!r}" in (action.help or "")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"meshpilot {importlib.metadata.version('meshpilot')}"


def test_version_without_installed_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    assert cli.version() == meshpilot.__version__


async def test_no_config_dir_logs_an_empty_mesh_and_how_to_give_config() -> None:
    settings = Settings(xds_address="127.0.0.1:0", monitoring_address="127.0.0.1:0")
    server = MeshServer(settings)
    with capture_logs() as logs:
        await server.start()
        await server.stop()
    [warning] = [e for e in logs if e["event"] == "no config source: serving an empty mesh"]
    assert "--config-dir DIR" in warning["hint"] and "MESHPILOT_CONFIG_DIR" in warning["hint"]
