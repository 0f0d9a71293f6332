"""README's "Point your own Envoy at meshpilot", run as written.

The commands come from the README section's code blocks and the config from
examples/own-envoy/, both read at test time, so the walkthrough cannot drift from
what works. One change, by plain text substitution in the commands and the YAML: the
walkthrough's fixed addresses and ports (127.0.0.5, 127.0.0.6, the control plane's
127.0.0.1:15010 and :15014, Envoy admin ports 15000 and 15100) become addresses from
unique_loopback_ip() and free ports, so that the test runs beside others; and
`.venv/bin/` becomes the directory of this interpreter. The commands run in a
temporary directory holding the rendered `examples/own-envoy/`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from tests.e2e.harness import ProcessTracker, free_port, http_get, unique_loopback_ip, wait_for

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own-envoy"
SECTION = "## Point your own Envoy at meshpilot"
SYNCED_TYPES = ("cluster", "listener", "route", "endpoint")


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def _code_blocks(section: str) -> list[list[str]]:
    """Each fenced block's commands: `\\`-continued lines joined, comments dropped."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", section, flags=re.S | re.M)
    out = []
    for block in blocks:
        joined = re.sub(r"\\\n\s*", " ", block)
        out.append([ln.strip() for ln in joined.splitlines() if ln.strip() and ln[0] != "#"])
    return out


def _substitute(text: str, table: dict[str, str]) -> str:
    # One pass with one regex: a replacement is never replaced again.
    pattern = re.compile("|".join(re.escape(k) for k in sorted(table, key=len, reverse=True)))
    return pattern.sub(lambda m: table[m.group(0)], text)


def _synced(entry: dict) -> bool:
    return all(
        entry.get(f"{t}_sent") and entry[f"{t}_sent"] == entry.get(f"{t}_acked")
        for t in SYNCED_TYPES
    )


def _no_proxy_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}


async def test_own_envoy_walkthrough_runs_as_written(
    processes: ProcessTracker, tmp_path: Path
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.fail("the walkthrough's checks use curl; install it", pytrace=False)
    web_ip, client_ip, cp_ip = (unique_loopback_ip() for _ in range(3))
    xds, monitoring = f"{cp_ip}:{free_port(cp_ip)}", f"{cp_ip}:{free_port(cp_ip)}"
    table = {
        "127.0.0.5": web_ip,
        "127.0.0.6": client_ip,
        "127.0.0.1:15010": xds,
        "127.0.0.1:15014": monitoring,
        "--admin-port 15000": f"--admin-port {free_port()}",
        "--admin-port 15100": f"--admin-port {free_port()}",
        ".venv/bin/": f"{Path(sys.executable).parent}/",
    }
    rendered = tmp_path / "examples" / "own-envoy"
    rendered.mkdir(parents=True)
    files = sorted(EXAMPLE.glob("*.yaml"))
    assert [f.name for f in files] == ["sidecars.yaml", "web-1.yaml", "web.yaml"]
    for path in files:
        (rendered / path.name).write_text(_substitute(path.read_text(), table))

    blocks = _code_blocks(_section())
    assert len(blocks) == 2, "the section has a block to start things and one to check"
    start, checks = ([_substitute(c, table) for c in b] for b in blocks)

    # --- start, in the README's order -----------------------------------------------------
    for n, line in enumerate(start):
        argv = shlex.split(line)
        background = argv[-1] == "&"
        argv = argv[:-1] if background else argv
        name = f"step{n}-{Path(argv[0]).name}"
        if not background:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=tmp_path,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await proc.communicate()
            assert proc.returncode == 0, f"{line}\n{out.decode()}"
            continue
        spawned = await processes.spawn(argv, ready_line=None, name=name, cwd=tmp_path)
        if argv[1:2] == ["serve"]:
            await wait_for(
                lambda: _ready(f"http://{monitoring}/ready"), 20, message="meshpilot /ready"
            )
        elif "meshpilot.demo.apps" in argv:
            await spawned.wait_for_line("ready")
        assert spawned.running, spawned.describe_exit()

    # Both Envoys connected and ACKed everything they were sent.
    async def both_synced() -> list[dict] | None:
        entries = (await http_get(f"http://{monitoring}/debug/syncz", timeout=2)).json()
        ok = len(entries) == 2 and all(_synced(e) for e in entries)
        return entries if ok else None

    entries = await wait_for(both_synced, 30, message="both Envoys to ACK their config")
    assert {e["proxy"].split("~")[2] for e in entries} == {"web-1.default", "client-1.default"}

    # --- the README's checks, with curl ---------------------------------------------------
    request, syncz, wrong_host = checks
    answer = await _curl_until_200(request)
    body = json.loads(answer)
    assert body["service"] == "web", body
    assert body["host"] == "web", body  # the application sees the Host the caller sent
    assert body["served_by"] == f"{web_ip}:8080", body

    listed = json.loads(await _curl(syncz))
    assert sorted(e["proxy"] for e in listed) == sorted(e["proxy"] for e in entries)
    assert all(_synced(e) for e in listed), listed

    # A Host no service matches must not reach an application: the README promises a
    # 404 whose body says no route matched (not an empty 502).
    status = (await _curl(wrong_host)).strip()
    assert status == "404", status
    body = await _curl(wrong_host.replace("-o /dev/null -w '%{http_code}\\n' ", ""))
    assert "no VirtualService or service matches this Host" in body, body


async def _ready(url: str) -> bool:
    try:
        return (await http_get(url, timeout=1)).status == 200
    except (OSError, TimeoutError):
        return False


async def _curl(line: str) -> str:
    argv = shlex.split(line)
    assert argv[0] == "curl", line
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_no_proxy_env(),  # curl would honour an http_proxy; Envoy is on loopback
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"{line}: exit {proc.returncode}: {err.decode()}"
    return out.decode()


async def _curl_until_200(line: str) -> str:
    """The first request may race the last route update: retry until it answers."""
    with_status = line.replace("curl -s", "curl -s -w '\\n%{http_code}'", 1)
    last = ""

    async def served() -> str | None:
        nonlocal last
        last = await _curl(with_status)
        body, _, status = last.rpartition("\n")
        return body if status == "200" else None

    return await wait_for(served, 10, message=f"200 from `{line}` (last: {last!r})")
