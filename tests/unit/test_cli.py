"""`meshpilot serve` refuses bad flags and files with a clear message and a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path


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
