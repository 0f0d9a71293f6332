"""Bookinfo on loopback, for the traffic-management end-to-end tests.

`examples/bookinfo-local/` is the mesh: Istio's `bookinfo.yaml` and
`tcp-echo-services.yaml` unchanged, plus WorkloadEntries and explicit-mode Sidecars
on fixed 127.0.5.N/127.0.6.N addresses. A test renders that directory with addresses
of its own (`unique_loopback_ip`), starts the demo apps there, an in-process
meshpilot on the directory, and real Envoy sidecars for the workloads it calls from:

    bi = await bookinfo(files=[sample("bookinfo/networking/destination-rule-all.yaml")])
    resp = await bi.call("reviews", "/reviews/0")            # via productpage's sidecar
    assert resp.json()["version"] == "v1"

Istio's manifests are applied by copying them into the config directory byte for
byte (`Bookinfo.apply`), which then waits until meshpilot has read them, pushed, and
every sidecar has ACKed (and warmed) what it was sent.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshpilot.api.parse import parse_text
from meshpilot.config import ConfigKey
from meshpilot.demo.apps import DemoServer
from tests.e2e.harness import (
    EnvoyProcess,
    HttpResult,
    ProcessTracker,
    tcp_roundtrip,
    unique_loopback_ip,
    wait_for,
)
from tests.e2e.mesh import Mesh
from tests.samples import ISTIO_SAMPLES

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "bookinfo-local"
SAMPLES = ISTIO_SAMPLES
NAMESPACE = "default"
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
HTTP_PORT = 9080
TCP_ECHO_PORT = 9000
# What Istio's tcp-echo-services.yaml deployments answer with.
TCP_ECHO_PREFIX = {"v1": "one", "v2": "two"}
_SHOWN_ROUTE_FIELDS = ("timeout", "prefix_rewrite", "host_rewrite_literal", "hash_policy")
_EXAMPLE_FILES = ("bookinfo.yaml", "tcp-echo-services.yaml", "workloads.yaml", "sidecars.yaml")


def sample(relpath: str) -> Path:
    """A file of Istio's sample corpus (`tests/data/istio-samples/samples/RELPATH`)."""
    path = SAMPLES / relpath
    if not path.is_file():
        # Not a skip: without the corpus the traffic scenarios would silently vanish.
        pytest.fail(f"Istio sample manifest missing: {path}", pytrace=False)
    return path


def fqdn(host: str) -> str:
    return f"{host}.{NAMESPACE}.svc.cluster.local"


def cluster(host: str, port: int = HTTP_PORT, subset: str = "") -> str:
    """Istio's outbound cluster name for a short service name in `default`."""
    return f"outbound|{port}|{subset}|{fqdn(host)}"


def binomial_tolerance(n: int, p: float, sds: float = 4.5) -> float:
    """Allowed |observed - n*p| for `n` draws with probability `p`: `sds` standard
    deviations (4.5 SD: about one false failure in 150,000 runs)."""
    return sds * math.sqrt(n * p * (1 - p))


def workload_entry_yaml(
    name: str,
    address: str,
    labels: Mapping[str, str],
    *,
    locality: str = "",
    ports: Mapping[str, int] | None = None,
) -> str:
    """A WorkloadEntry in `default` (for workloads the example does not have)."""
    lines = [
        "apiVersion: networking.istio.io/v1",
        "kind: WorkloadEntry",
        f"metadata: {{name: {name}}}",
        "spec:",
        f"  address: {address}",
        "  labels: {" + ", ".join(f"{k}: {v}" for k, v in labels.items()) + "}",
    ]
    if locality:
        lines.append(f"  locality: {locality}")
    if ports:
        lines.append("  ports: {" + ", ".join(f"{k}: {v}" for k, v in ports.items()) + "}")
    return "\n".join(lines) + "\n"


# --- the example's workloads ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExampleWorkload:
    """One WorkloadEntry of examples/bookinfo-local and its Sidecar's egress bind."""

    name: str
    app: str
    version: str
    address: str
    egress: str | None
    service_account: str

    @property
    def is_tcp(self) -> bool:
        return self.app == "tcp-echo"

    @property
    def port(self) -> int:
        return TCP_ECHO_PORT if self.is_tcp else HTTP_PORT


def example_workloads(example: Path = EXAMPLE) -> dict[str, ExampleWorkload]:
    """The example's workloads by name, read from its own files."""
    binds: dict[tuple[str, str], str] = {}
    path = example / "sidecars.yaml"
    for cfg in parse_text(path.read_text(), str(path)).configs:
        selector = cfg.spec.workload_selector.labels
        binds[(selector["app"], selector["version"])] = cfg.spec.egress[0].bind
    out: dict[str, ExampleWorkload] = {}
    path = example / "workloads.yaml"
    for cfg in parse_text(path.read_text(), str(path)).configs:
        labels = cfg.spec.labels
        out[cfg.name] = ExampleWorkload(
            name=cfg.name,
            app=labels["app"],
            version=labels["version"],
            address=cfg.spec.address,
            egress=binds.get((labels["app"], labels["version"])),
            service_account=cfg.spec.service_account,
        )
    return out


def render_example(dest: Path, addresses: Mapping[str, str], example: Path = EXAMPLE) -> None:
    """Copy the example into `dest`, replacing each example address by `addresses[it]`.

    Istio's manifests in it are copied byte for byte; only our own files change.
    """
    dest.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(
        r"(?<![\d.])("
        + "|".join(re.escape(a) for a in sorted(addresses, key=len)[::-1])
        + r")(?![\d])"
    )
    for name in _EXAMPLE_FILES:
        src = example / name
        if name in ("bookinfo.yaml", "tcp-echo-services.yaml"):
            shutil.copyfile(src, dest / name)
            continue
        text = pattern.sub(lambda m: addresses[m.group(1)], src.read_text())
        (dest / name).write_text(text)


# --- a running bookinfo -----------------------------------------------------------------


@dataclass(slots=True)
class Workload:
    """A workload of the running mesh: its app, addresses, and sidecar if started."""

    spec: ExampleWorkload
    address: str
    egress: str | None
    app: DemoServer | None = None
    sidecar: EnvoyProcess | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def labels(self) -> dict[str, str]:
        return {"app": self.spec.app, "version": self.spec.version}


@dataclass(slots=True)
class Bookinfo:
    """The mesh of one test: config dir, meshpilot, apps, sidecars, and clients."""

    processes: ProcessTracker
    config_dir: Path
    mesh: Mesh
    delta: bool
    workloads: dict[str, Workload]
    # Sidecars of workloads outside the example (`ExtraSidecar`), by name, with
    # their egress address.
    extra_sidecars: dict[str, tuple[EnvoyProcess, str]] = field(default_factory=dict)
    _session: aiohttp.ClientSession | None = None

    # -- lookup -------------------------------------------------------------------------

    def app(self, name: str) -> DemoServer:
        app = self.workloads[name].app
        assert app is not None, f"{name} has no app running"
        return app

    def sidecar(self, name: str = "productpage-v1") -> EnvoyProcess:
        if name in self.extra_sidecars:
            return self.extra_sidecars[name][0]
        envoy = self.workloads[name].sidecar
        assert envoy is not None, f"{name} has no sidecar running"
        return envoy

    def egress(self, via: str = "productpage-v1") -> str:
        if via in self.extra_sidecars:
            return self.extra_sidecars[via][1]
        addr = self.workloads[via].egress
        assert addr is not None, f"{via} has no egress address"
        return addr

    @property
    def sidecars(self) -> list[EnvoyProcess]:
        own = [w.sidecar for w in self.workloads.values() if w.sidecar is not None]
        return own + [envoy for envoy, _ in self.extra_sidecars.values()]

    def counts(self, *names: str) -> dict[str, int]:
        """How many requests each named app has received so far."""
        return {n: len(self.app(n).requests) for n in names}

    # -- config -------------------------------------------------------------------------

    async def apply(
        self,
        *files: Path | tuple[str, str],
        remove: Iterable[str | Path] = (),
        timeout: float = 15.0,  # noqa: ASYNC109 - one deadline for the whole convergence
    ) -> None:
        """Copy manifests in (a Path: byte for byte under its own name; (name, text):
        written), delete `remove` (names or Paths), and wait until every sidecar has
        what meshpilot generated from the result."""
        for item in remove:
            (self.config_dir / Path(item).name).unlink()
        for item in files:
            if isinstance(item, Path):
                shutil.copyfile(item, self.config_dir / item.name)
            else:
                name, text = item
                self.mesh.write(name, text)
        await self.converged(timeout)

    def _expected_store(self) -> set[tuple[ConfigKey, str]]:
        out: set[tuple[ConfigKey, str]] = set()
        for path in sorted(self.config_dir.iterdir()):
            if path.suffix not in CONFIG_SUFFIXES or not path.is_file():
                continue
            result = parse_text(path.read_text(), str(path))
            if result.errors:
                pytest.fail(f"test config {path.name} has errors: {result.errors}", pytrace=False)
            out |= {(c.key, c.revision) for c in result.configs}
        return out

    def _store_matches(self, expected: set[tuple[ConfigKey, str]]) -> bool:
        snap = self.mesh.server.store.snapshot()
        have = {(c.key, c.revision) for kind in snap.by_kind.values() for c in kind.values()}
        return have == expected

    def _proxies_idle(self) -> bool:
        server = self.mesh.server
        if server.pusher.pending is not None:
            return False
        for envoy in self.sidecars:
            conns = server.discovery.connections_for(envoy.name)
            if not conns:
                return False
            for conn in conns:
                if conn.has_pending_push:
                    return False
                if any(w.awaiting_ack or w.dirty is not None for w in conn.watched.values()):
                    return False
        return True

    async def _envoys_warm(self) -> bool:
        for envoy in self.sidecars:
            stats = await envoy.stats(
                r"^(cluster_manager\.warming_clusters|listener_manager\.total_listeners_warming)$"
            )
            if any(v != 0 for v in stats.values()):
                return False
        return True

    async def converged(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        """Until the store holds exactly the config dir, the push is out, every sidecar
        has ACKed everything it was sent and has nothing warming; twice in a row."""
        expected = self._expected_store()

        async def settled() -> bool:
            if not self._store_matches(expected) or not self._proxies_idle():
                return False
            if not await self._envoys_warm():
                return False
            await asyncio.sleep(0.1)
            return self._proxies_idle() and self._store_matches(expected)

        await wait_for(
            settled,
            timeout,
            interval=0.05,
            message="meshpilot to load the config dir and every sidecar to ACK it",
            on_timeout=self._sync_report,
        )

    def _sync_report(self) -> str:
        errors = [str(e) for e in self.mesh.server.store.errors()]
        return f"store errors: {errors}\nsyncz: {self.mesh.server.sync_status()}"

    # -- clients ------------------------------------------------------------------------

    def session(self) -> aiohttp.ClientSession:
        """A keep-alive client session (Envoy routes each request on its own)."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64),
                auto_decompress=False,
                trust_env=False,
            )
        return self._session

    async def call(
        self,
        host: str,
        path: str = "/",
        *,
        via: str = "productpage-v1",
        port: int = HTTP_PORT,
        headers: Mapping[str, str] | None = None,
        method: str = "GET",
        timeout: float = 10.0,  # noqa: ASYNC109 - one total deadline per request
        fresh: bool = False,
    ) -> HttpResult:
        """One request from workload `via`'s app through its sidecar to `host:port`."""
        url = f"http://{self.egress(via)}:{port}{path}"
        send = {"Host": f"{host}:{port}", **(headers or {})}
        session = self.session()
        own = None
        if fresh:
            own = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                auto_decompress=False,
                trust_env=False,
            )
            session = own
        try:
            async with session.request(
                method,
                url,
                headers=send,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                body = await resp.read()
                merged: dict[str, str] = {}
                for key, value in resp.headers.items():
                    k = key.lower()
                    merged[k] = f"{merged[k]},{value}" if k in merged else value
                return HttpResult(resp.status, merged, body)
        finally:
            if own is not None:
                await own.close()

    async def timed_call(
        self, host: str, path: str = "/", **kwargs: Any
    ) -> tuple[HttpResult, float]:
        t0 = time.monotonic()
        resp = await self.call(host, path, **kwargs)
        return resp, time.monotonic() - t0

    async def versions(
        self,
        host: str,
        n: int,
        path: str = "/",
        *,
        headers: Mapping[str, str] | None = None,
        via: str = "productpage-v1",
        port: int = HTTP_PORT,
        concurrency: int = 16,
    ) -> Counter[str]:
        """Send `n` requests; count who answered (`version` of the JSON answer, or
        `HTTP NNN` for anything but 200)."""
        return await gather_limited(
            n, concurrency, lambda: self._version_of(host, path, headers, via, port)
        )

    async def _version_of(
        self, host: str, path: str, headers: Mapping[str, str] | None, via: str, port: int
    ) -> str:
        resp = await self.call(host, path, headers=headers, via=via, port=port)
        if resp.status != 200:
            return f"HTTP {resp.status}"
        return str(resp.json()["version"])

    async def tcp_versions(
        self,
        n: int,
        *,
        via: str = "productpage-v1",
        port: int = TCP_ECHO_PORT,
        concurrency: int = 16,
    ) -> Counter[str]:
        """`n` connections to tcp-echo through `via`'s sidecar; count the prefixes."""
        addr = self.egress(via)

        async def one() -> str:
            try:
                answer = await tcp_roundtrip(addr, port, b"hello\n", until=b"\n", timeout=5)
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as e:
                return f"error {type(e).__name__}"
            prefix, _, rest = answer.decode().rstrip("\n").partition(" ")
            assert rest == "hello", answer
            return prefix

        return await gather_limited(n, concurrency, one)

    # -- diagnosis ------------------------------------------------------------------------

    async def routes(self, via: str = "productpage-v1", name: str | None = None) -> str:
        """Envoy's own route table of `via`, compactly, for assertion messages."""
        return describe_routes(await self.sidecar(via).config_dump("dynamic_route_configs"), name)

    async def cluster_names(self, via: str = "productpage-v1") -> list[str]:
        return sorted(await self.sidecar(via).clusters())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self.mesh.stop()


@dataclass(frozen=True, slots=True)
class ExtraSidecar:
    """A sidecar for a workload the example does not have; its WorkloadEntry and
    Sidecar (egress bound to `egress`) are the test's to write."""

    name: str
    ip: str
    egress: str
    labels: Mapping[str, str]
    locality: str = ""


class BookinfoFactory:
    """The `bookinfo` fixture: `await bookinfo(...)` starts one mesh for the test."""

    def __init__(self, processes: ProcessTracker, tmp_path: Path) -> None:
        self.processes = processes
        self.tmp_path = tmp_path
        self.started: list[Bookinfo] = []

    async def __call__(
        self,
        *,
        files: Sequence[Path | tuple[str, str]] = (),
        sidecars: Sequence[str] = ("productpage-v1",),
        delta: bool = False,
        mesh_config: str | None = None,
        app_options: Mapping[str, Mapping[str, Any]] | None = None,
        localities: Mapping[str, str] | None = None,
        extra_sidecars: Sequence[ExtraSidecar] = (),
    ) -> Bookinfo:
        """Render the example, start every app, meshpilot (with `files` already in
        the config dir) and the sidecars of `sidecars` and `extra_sidecars`; return
        once all are synced.

        Every Envoy starts here, at once, before any ADS stream is open: forking
        (with the harness's `preexec_fn`) while gRPC threads are busy with streams
        can crash the child.
        """
        specs = example_workloads()
        workloads: dict[str, Workload] = {}
        addresses: dict[str, str] = {}
        for spec in specs.values():
            addr = unique_loopback_ip()
            addresses[spec.address] = addr
            egress = None
            if spec.egress is not None:
                egress = unique_loopback_ip()
                addresses[spec.egress] = egress
            workloads[spec.name] = Workload(spec, addr, egress)
        config_dir = self.tmp_path / "config"
        render_example(config_dir, addresses)
        for item in files:
            if isinstance(item, Path):
                shutil.copyfile(item, config_dir / item.name)
            else:
                (config_dir / item[0]).write_text(item[1])
        options = dict(app_options or {})
        for w in workloads.values():
            if w.spec.is_tcp:
                w.app = await self.processes.demo_tcp_echo(
                    w.address, w.spec.port, TCP_ECHO_PREFIX[w.spec.version]
                )
            else:
                upstream = f"http://{w.egress}:{HTTP_PORT}" if w.egress else None
                w.app = await self.processes.demo_http(
                    w.address,
                    w.spec.port,
                    service=w.spec.app,
                    version=w.spec.version,
                    upstream=upstream,
                    **options.get(w.name, {}),
                )
        settings: dict[str, Any] = {"debounce_after": 0.05}
        if mesh_config is not None:
            path = self.tmp_path / "mesh.yaml"
            path.write_text(mesh_config)
            settings["mesh_config"] = path
        mesh = Mesh(config_dir, **settings)
        bi = Bookinfo(self.processes, config_dir, mesh, delta, workloads)
        self.started.append(bi)
        await mesh.start()
        envoys = await asyncio.gather(
            *(self._sidecar(bi, workloads[n], (localities or {}).get(n, "")) for n in sidecars),
            *(self._extra_sidecar(bi, extra) for extra in extra_sidecars),
        )
        for name, envoy in zip(sidecars, envoys, strict=False):
            workloads[name].sidecar = envoy
        for extra, envoy in zip(extra_sidecars, envoys[len(sidecars) :], strict=True):
            bi.extra_sidecars[extra.name] = (envoy, extra.egress)
        for envoy in envoys:
            await envoy.wait_live()
        await bi.converged()
        return bi

    async def _sidecar(self, bi: Bookinfo, w: Workload, locality: str) -> EnvoyProcess:
        assert w.egress is not None, f"{w.name} has no Sidecar in the example"
        return await self.processes.envoy(
            name=w.name,
            namespace=NAMESPACE,
            ip=w.address,
            labels=w.labels,
            service_account=w.spec.service_account or "default",
            xds_address=bi.mesh.xds_address,
            delta=bi.delta,
            locality=locality,
        )

    async def _extra_sidecar(self, bi: Bookinfo, extra: ExtraSidecar) -> EnvoyProcess:
        return await self.processes.envoy(
            name=extra.name,
            namespace=NAMESPACE,
            ip=extra.ip,
            labels=dict(extra.labels),
            xds_address=bi.mesh.xds_address,
            delta=bi.delta,
            locality=extra.locality,
        )

    async def close(self) -> None:
        for bi in self.started:
            await bi.close()


async def cluster_stat(envoy: EnvoyProcess, cluster_name: str, stat: str) -> int:
    """A cluster counter, under the cluster's name or its Istio `alt_stat_name`
    (`NAME;`, so that `cluster.NAME;.upstream_rq_total` can be told apart)."""
    escaped = "".join(f"\\{c}" if c in ".|()[]{}*+?^$\\" else c for c in cluster_name)
    stats = await envoy.stats(f"^cluster\\.{escaped};?\\.{stat}$")
    return sum(v for v in stats.values() if isinstance(v, int))


async def gather_limited(
    n: int, concurrency: int, make: Callable[[], Awaitable[str]]
) -> Counter[str]:
    """Run `make()` `n` times, at most `concurrency` at once; count the results."""
    sem = asyncio.Semaphore(concurrency)

    async def one() -> str:
        async with sem:
            return await make()

    return Counter(await asyncio.gather(*(one() for _ in range(n))))


def describe_routes(dump: Any, name: str | None = None) -> str:
    """`vhost domains -> match -> action` lines from an Envoy routes config dump."""
    lines = []
    for entry in dump.get("configs", []):
        rc = entry.get("route_config", {})
        if name is not None and rc.get("name") != name:
            continue
        lines.append(f"route config {rc.get('name')!r}:")
        for vh in rc.get("virtual_hosts", []):
            lines.append(f"  vhost {vh.get('name')} {vh.get('domains', [])[:2]}")
            for r in vh.get("routes", []):
                action = r.get("route") or r.get("redirect") or r.get("direct_response") or {}
                target = action.get("cluster") or action.get("weighted_clusters") or action
                extras = _route_extras(r.get("route") or {})
                filters = sorted(r.get("typed_per_filter_config", {}))
                lines.append(f"    {r.get('match', {})} -> {target} {extras} {filters}")
    return "\n".join(lines) or "(no dynamic route configs)"


def _route_extras(action: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in action.items() if k in _SHOWN_ROUTE_FIELDS}
    retries = action.get("retry_policy", {})
    if retries:
        out["retries"] = f"{retries.get('num_retries', 1)} on {retries.get('retry_on')}"
    return out
