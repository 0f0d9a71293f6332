"""The repository stands alone: a user's clone has nothing beside it.

No file may reach outside the repository for test data or documentation, and the
text a user reads speaks of behaviour, not of how the project was organised.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache"}
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".txt", ".cfg", ".sh", ""}
# Istio's own files are kept byte for byte, whatever they say.
VERBATIM = REPO / "tests" / "data" / "istio-samples"

# Built from parts, so that this file does not itself hold the text it looks for.
_BESIDE = "sha" + "red"
OUTSIDE = re.compile(rf"\.\./{_BESIDE}|{_BESIDE}/istio-samples|{_BESIDE}/DESIGN")
PROCESS_WORDS = re.compile(
    r"\b[Ii]ssue \d|\bacceptance (point|scenario)|\bfounding session\b|\bTODO\(issue"
)


def repo_files() -> list[Path]:
    out = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts):
            continue
        if path.is_file() and path.suffix in SUFFIXES and not path.is_relative_to(VERBATIM):
            if path.name in {"Makefile", "Dockerfile"} or path.suffix:
                out.append(path)
    return out


def offenders(pattern: re.Pattern[str]) -> list[str]:
    me = Path(__file__).resolve()
    found = []
    for path in repo_files():
        if path == me:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), start=1):
            if pattern.search(line):
                found.append(f"{path.relative_to(REPO)}:{lineno}: {line.strip()[:100]}")
    return found


def test_the_walk_sees_the_repository() -> None:
    names = {p.relative_to(REPO).as_posix() for p in repo_files()}
    assert {"README.md", "Makefile", "docs/architecture.md", "meshpilot/serve.py"} <= names


def test_nothing_refers_to_a_directory_beside_the_repo() -> None:
    assert not offenders(OUTSIDE)


def test_no_development_process_words() -> None:
    assert not offenders(PROCESS_WORDS)


def test_istio_samples_carry_their_licence_and_provenance() -> None:
    assert (VERBATIM / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert "Istio" in (VERBATIM / "NOTICE").read_text()
    provenance = (VERBATIM / "PROVENANCE.md").read_text()
    samples = sorted(p for p in (VERBATIM / "samples").rglob("*") if p.is_file())
    assert len(samples) >= 30
    for path in samples:
        assert path.relative_to(VERBATIM).as_posix() in provenance, path
