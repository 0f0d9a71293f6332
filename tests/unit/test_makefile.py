"""`make install` and `make run` as a new user meets them, checked with `make -n`."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _make_n(*args: str) -> list[str]:
    make = shutil.which("make")
    if make is None:
        pytest.fail("`make` is required (README: Requirements)", pytrace=False)
    out = subprocess.run(
        [make, "-n", "-C", str(ROOT), "--no-print-directory", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.splitlines()


def _setuptools_editable_box(env: dict[str, str]) -> str:
    """stderr of setuptools emitting its editable-install information box."""
    code = (
        "from setuptools.warnings import InformationOnly\n"
        "InformationOnly.emit('Editable installation.', 'Please be careful with folders in "
        "your working directory with the same name as your package.')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30
    ).stderr


def test_install_says_what_it_downloads_before_pip_and_shows_progress(tmp_path: Path) -> None:
    lines = _make_n("install", f"VENV={tmp_path / 'venv'}")
    pips = [i for i, line in enumerate(lines) if " -m pip install" in line]
    assert pips, lines
    said = [i for i, line in enumerate(lines) if re.search(r"downloads about \d+ MB", line)]
    assert said and said[0] < pips[0], lines
    for i in pips:
        assert not re.search(r"\s-q\b", lines[i]), lines[i]
        assert "--progress-bar on" in lines[i], lines[i]


def test_install_filters_setuptools_editable_box(tmp_path: Path) -> None:
    (editable,) = [
        line for line in _make_n("install", f"VENV={tmp_path / 'venv'}") if " -e " in line
    ]
    assignments = dict(
        word.split("=", 1) for word in shlex.split(editable) if re.match(r"^[A-Z_]+=", word)
    )
    assert "PYTHONWARNINGS" in assignments, editable
    base = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    # The filter is only worth something if setuptools really prints the box without it.
    assert "be careful with folders" in _setuptools_editable_box(base)
    filtered = _setuptools_editable_box({**base, **assignments})
    assert "be careful with folders" not in filtered, filtered


def test_install_is_idempotent_once_stamped(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed").touch()
    pyproject = (ROOT / "pyproject.toml").stat().st_mtime
    os.utime(venv / ".installed", (pyproject + 10, pyproject + 10))
    assert not any("pip" in line for line in _make_n("install", f"VENV={venv}"))


def test_run_passes_args_to_the_demo(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed"
    stamp.touch()
    pyproject = (ROOT / "pyproject.toml").stat().st_mtime
    os.utime(stamp, (pyproject + 10, pyproject + 10))
    lines = _make_n("run", f"VENV={venv}", "ARGS=--check --xds-port 16010")
    assert lines[-1].endswith("-m meshpilot.demo --check --xds-port 16010"), lines
