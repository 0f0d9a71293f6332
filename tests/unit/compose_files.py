"""docker-compose.yml, Dockerfile and examples/compose-mesh, loaded for the tests.

There is no Docker engine where the tests run (and no `docker compose` plugin to run
`docker compose config`), so the compose file is parsed and interpolated here as
Compose would: `$$`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`, with the
variables in ENV (set with use_env()). The control plane's WorkloadEntries are the
template it renders at start, rendered with its container's environment.
"""

from __future__ import annotations

import argparse
import functools
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from meshpilot import cli
from meshpilot.agent import bootstrap
from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.config import Config
from meshpilot.demo import render
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.push_context import PushContext

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MESH_DIR = ROOT / "examples" / "compose-mesh"
README = ROOT / "README.md"
DOMAIN = "svc.cluster.local"
SERVICE_PORT = 9080

# What the compose mesh is: the workloads (compose service names of the app
# containers, and WorkloadEntry names) behind each Service.
EXPECTED_WORKLOADS = {
    "productpage": ["productpage-v1"],
    "reviews": ["reviews-v1", "reviews-v2"],
    "ratings": ["ratings-v1"],
}

TOP_LEVEL_KEYS = {"name", "services", "networks", "volumes", "configs", "secrets", "include"}
# Compose-spec service attributes (the commonly used part; a typo fails the test).
SERVICE_KEYS = {
    "build", "cap_add", "cap_drop", "command", "configs", "container_name", "cpus",
    "depends_on", "deploy", "devices", "dns", "entrypoint", "env_file", "environment",
    "expose", "extra_hosts", "healthcheck", "hostname", "image", "init", "labels",
    "logging", "mem_limit", "network_mode", "networks", "pid", "platform", "ports",
    "profiles", "pull_policy", "read_only", "restart", "secrets", "security_opt",
    "stop_grace_period", "stop_signal", "sysctls", "tmpfs", "tty", "ulimits", "user",
    "volumes", "working_dir",
}  # fmt: skip
HEALTHCHECK_KEYS = {"test", "interval", "timeout", "retries", "start_period", "disable"}
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


# Another subnet, every variable set: nothing may still point at a default.
CUSTOM_ENV = {
    "MESH_SUBNET": "10.89.0.0/24",
    "MESH_GATEWAY": "10.89.0.1",
    "MESHPILOT_IP": "10.89.0.2",
    "PRODUCTPAGE_V1_IP": "10.89.0.11",
    "REVIEWS_V1_IP": "10.89.0.12",
    "REVIEWS_V2_IP": "10.89.0.13",
    "RATINGS_V1_IP": "10.89.0.14",
}
DEFAULT_SUBNET = "198.18.0.0/24"
ENV: dict[str, str] = {}


# --- loading -------------------------------------------------------------------------

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<rest>[^}]*)\})")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: `$$`, `${NAME}`, `${NAME:-default}`, `${NAME-default}`."""

    def one(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name, rest = m.group("name"), m.group("rest")
        if rest.startswith(":-"):
            return env.get(name) or rest[2:]
        if rest.startswith("-"):
            return env.get(name, rest[1:])
        assert rest == "", f"docker-compose.yml: unsupported interpolation {m.group(0)}"
        assert name in env, f"docker-compose.yml: ${{{name}}} has no default"
        return env[name]

    out = _VARIABLE.sub(one, text)
    assert not re.search(r"\$[A-Za-z_{]", out.replace("$$", "")), "bare $VAR: use ${VAR:-default}"
    return out


def variables() -> dict[str, set[str]]:
    """Each Compose variable -> the defaults it is given (one, where it is used)."""
    found: dict[str, set[str]] = {}
    for m in _VARIABLE.finditer(COMPOSE_FILE.read_text()):
        if m.group("name"):
            found.setdefault(m.group("name"), set()).add(m.group("rest").removeprefix(":-"))
    return found


@functools.cache
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict), "docker-compose.yml must be a mapping"

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return interpolate(value, ENV)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    return dict(walk(doc))


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def rendered_files() -> dict[str, str]:
    """What the control plane reads: the mounted files and the rendered template."""
    name, _, (template, output) = control_plane()
    files = {str(path): path.read_text() for path in sorted(MESH_DIR.glob("*.yaml"))}
    source = MESH_DIR / Path(template).relative_to(mounted_config_dir(name))
    env = {str(k): str(v) for k, v in (services()[name].get("environment") or {}).items()}
    files[output] = render.render(source.read_text(), env, str(source))
    return files


@functools.cache
def mesh_configs() -> tuple[Config, ...]:
    configs: list[Config] = []
    for origin, text in rendered_files().items():
        result = parse_text(text, origin)
        assert result.errors == [], [str(e) for e in result.errors]
        configs += result.configs
    return tuple(configs)


@functools.cache
def push_context() -> PushContext:
    store = ConfigStore()
    store.set_origin(str(MESH_DIR), mesh_configs())
    return PushContext.build(store.snapshot(), MeshConfig())


def of_kind(kind: str) -> dict[str, Config]:
    return {c.name: c for c in mesh_configs() if c.kind == kind}


def cli_parser() -> argparse.ArgumentParser:
    """The real `meshpilot serve` and `meshpilot bootstrap` argument parsers."""
    parser = argparse.ArgumentParser(prog="meshpilot")
    sub = parser.add_subparsers(dest="command", required=True)
    cli._serve_parser(sub)
    bootstrap.register(sub)
    return parser


def as_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def depends_on(svc: dict[str, Any]) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def static_ips() -> dict[str, str]:
    """Compose service -> its `ipv4_address` (services without one are left out)."""
    ips = {}
    for name, svc in services().items():
        nets = svc.get("networks") or {}
        for spec in nets.values() if isinstance(nets, dict) else ():
            if spec and "ipv4_address" in spec:
                ips[name] = str(spec["ipv4_address"])
    return ips


def sidecars() -> dict[str, str]:
    """Sidecar service -> the app service whose network namespace it joins."""
    out = {}
    for name, svc in services().items():
        mode = str(svc.get("network_mode", ""))
        if mode.startswith("service:"):
            out[name] = mode.removeprefix("service:")
    return out


def shell_steps(name: str) -> list[list[str]]:
    """A service's `/bin/sh -c` script as its `&&`-separated commands."""
    svc = services()[name]
    entrypoint = as_list(svc.get("entrypoint"))
    assert entrypoint[:1] == ["/bin/sh"] and entrypoint[-1].endswith("c"), (
        f"{name}: the entrypoint must be `/bin/sh -c` (got {entrypoint})"
    )
    command = svc.get("command")
    assert isinstance(command, list) and len(command) == 1, f"{name}: one shell script"
    steps: list[list[str]] = [[]]
    for token in shlex.split(command[0]):
        if token == "&&":
            steps.append([])
        else:
            steps[-1].append(token)
    return steps


def control_plane() -> tuple[str, argparse.Namespace, tuple[str, str]]:
    """The service running `meshpilot serve`, its parsed arguments, and the (template,
    output) it renders first."""
    found = [
        name
        for name, svc in services().items()
        if "meshpilot serve" in " ".join(as_list(svc.get("command")))
    ]
    assert len(found) == 1, "exactly one service must run `meshpilot serve`"
    name = found[0]
    steps = shell_steps(name)
    assert len(steps) == 2, f"{name}: expected `python -m meshpilot.demo.render ... && exec ...`"
    rendering, serve = steps
    assert rendering[:3] == ["python", "-m", "meshpilot.demo.render"], rendering
    assert len(rendering) == 5, f"{name}: render TEMPLATE OUTPUT, got {rendering}"
    assert serve[:3] == ["exec", "meshpilot", "serve"], f"{name}: meshpilot must replace sh"
    return name, cli_parser().parse_args(serve[2:]), (rendering[3], rendering[4])


def mounted_config_dir(name: str) -> str:
    """The container path where examples/compose-mesh is mounted in service `name`."""
    found = [t for s, t, _ in bind_mounts(services()[name]) if (ROOT / s).resolve() == MESH_DIR]
    assert len(found) == 1, f"{name}: examples/compose-mesh must be mounted once"
    return found[0]


def sidecar_steps(name: str) -> tuple[argparse.Namespace, list[str]]:
    """A sidecar's shell command split into `meshpilot bootstrap` args and the envoy argv."""
    steps = shell_steps(name)
    assert len(steps) == 2, f"{name}: expected `meshpilot bootstrap ... && exec envoy ...`"
    boot, envoy = steps
    assert boot[:2] == ["meshpilot", "bootstrap"], f"{name}: first step is {boot[:2]}"
    assert envoy[:2] == ["exec", "envoy"], f"{name}: Envoy must replace the shell (exec)"
    return cli_parser().parse_args(boot[1:]), envoy[1:]


def app_flags(name: str) -> dict[str, str]:
    svc = services()[name]
    assert as_list(svc.get("entrypoint")) == ["python", "-m", "meshpilot.demo.apps"], name
    argv = as_list(svc.get("command"))
    assert argv[:1] == ["http"], f"{name}: the app must be the HTTP demo backend"
    flags = argv[1:]
    assert len(flags) % 2 == 0 and all(f.startswith("--") for f in flags[::2]), argv
    return dict(zip(flags[::2], flags[1::2], strict=True))


def bind_mounts(svc: dict[str, Any]) -> Iterator[tuple[str, str, bool]]:
    """(host source, container target, read-only) of each bind mount."""
    for vol in svc.get("volumes") or []:
        if isinstance(vol, dict):
            if vol.get("type") == "bind":
                yield vol["source"], vol["target"], bool(vol.get("read_only"))
            continue
        source, _, rest = str(vol).partition(":")
        target, _, mode = rest.partition(":")
        if source.startswith((".", "/", "~")):  # otherwise a named volume
            yield source, target, "ro" in mode.split(",")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def use_env(env: dict[str, str]) -> None:
    """Load everything below as `docker compose` would with these variables set."""
    ENV.clear()
    ENV.update(env)
    for cached in (compose, mesh_configs, push_context):
        cached.cache_clear()
