"""`meshpilot serve` CA flags and their errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from meshpilot.ca.cli import add_serve_arguments, parse_ttl, settings_kwargs
from meshpilot.settings import Settings

from ._helpers import copy_plugin_dir


def _parse(*argv: str) -> Settings:
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    return Settings(**settings_kwargs(p.parse_args(argv)))


def test_defaults() -> None:
    s = _parse()
    assert s.ca_dir is None
    assert s.trust_domain is None
    assert s.secure_xds_address == "127.0.0.1:15012"
    assert s.workload_cert_ttl == 24 * 3600
    assert s.max_workload_cert_ttl == 90 * 24 * 3600
    s.validate()


@pytest.mark.parametrize(
    ("text", "seconds"), [("2160h", 2160 * 3600.0), ("90d", 90 * 86400.0), ("30s", 30.0)]
)
def test_ttl_forms(text: str, seconds: float) -> None:
    assert parse_ttl(text) == seconds


def test_flags_reach_settings(tmp_path: Path) -> None:
    s = _parse(
        "--ca-dir", str(tmp_path), "--trust-domain", "example.org",
        "--secure-xds-address", "0.0.0.0:15012",
        "--workload-cert-ttl", "1h", "--max-workload-cert-ttl", "90d",
    )  # fmt: skip
    assert (s.ca_dir, s.trust_domain) == (tmp_path, "example.org")
    assert (s.workload_cert_ttl, s.max_workload_cert_ttl) == (3600.0, 90 * 86400.0)


def test_default_ttl_above_maximum_is_refused() -> None:
    with pytest.raises(ValueError, match="--workload-cert-ttl"):
        _parse("--workload-cert-ttl", "48h", "--max-workload-cert-ttl", "24h").validate()


@pytest.mark.parametrize("bad", ["0s", "-1h", "soon", "1"])
def test_bad_ttl_is_a_usage_error(bad: str) -> None:
    with pytest.raises(SystemExit):
        _parse("--workload-cert-ttl", bad)


def test_serve_with_a_broken_plugin_dir_exits_naming_the_file(tmp_path: Path) -> None:
    d = copy_plugin_dir(tmp_path / "ca")
    (d / "ca-key.pem").write_text("garbage\n")
    done = subprocess.run(
        [sys.executable, "-m", "meshpilot", "serve", "--ca-dir", str(d),
         "--xds-address", "127.0.0.1:0", "--monitoring-address", "127.0.0.1:0",
         "--secure-xds-address", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert f"{d / 'ca-key.pem'}: not a PEM private key" in done.stderr
