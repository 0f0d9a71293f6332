"""The `meshpilot` command.

`meshpilot serve` flags follow istiod's habit of one environment variable per setting:
each flag not given on the command line is read from MESHPILOT_<FLAG_NAME>; a list
flag (--config-dir) takes several values there separated by os.pathsep, like PATH.

`meshpilot agent` runs beside every Envoy, so it is handed to the agent's own entry
point before anything of the control plane (or asyncio, structlog, the CA) is imported:
this module's top-level imports stay light and the others are imported where used.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import meshpilot
from meshpilot.durations import duration_arg

if TYPE_CHECKING:
    from meshpilot.settings import Settings


@dataclass(frozen=True, slots=True)
class _Flag:
    """One `meshpilot serve` flag, read from MESHPILOT_<NAME> when not given."""

    flag: str
    default: str | None  # as a user would write it; None: unset unless given
    help: str
    metavar: str | None = None
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    repeatable: bool = False
    boolean: bool = False  # a switch: given means true; the variable takes true/false

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return f"MESHPILOT_{self.dest.upper()}"

    def help_text(self) -> str:
        allowed = f"one of {', '.join(self.choices)}; " if self.choices else ""
        default = self.default if self.default is not None else "none"
        env = self.env
        if self.repeatable:
            # Like PATH: the separator that never occurs inside a single path here.
            env += f", several separated by {os.pathsep!r}"
        return f"{self.help} ({allowed}default: {default}; env {env})"


def _bool_arg(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


_SERVE_FLAGS = (
    _Flag(
        "--config-dir",
        None,
        "directory of Kubernetes/Istio YAML or JSON, watched for changes; "
        "repeatable. Without one the mesh is empty",
        metavar="DIR",
        type=Path,
        repeatable=True,
    ),
    _Flag("--mesh-config", None, "Istio MeshConfig YAML", metavar="FILE", type=Path),
    _Flag("--xds-address", "127.0.0.1:15010", "plaintext xDS (ADS) listen address", "HOST:PORT"),
    _Flag(
        "--monitoring-address",
        "127.0.0.1:15014",
        "/ready, /metrics and /debug/* listen address",
        "HOST:PORT",
    ),
    _Flag(
        "--debounce-after",
        "100ms",
        "quiet time after a config change before pushing",
        "DURATION",
        duration_arg,
    ),
    _Flag(
        "--debounce-max",
        "10s",
        "longest a push waits for changes to settle",
        "DURATION",
        duration_arg,
    ),
    _Flag(
        "--kubeconfig",
        None,
        "follow this Kubernetes cluster (Services, EndpointSlices, Pods, Istio CRDs, mesh "
        "ConfigMap), run the CA from its Secrets, elect a leader and serve sidecar injection",
        metavar="FILE",
        type=Path,
    ),
    _Flag(
        "--context",
        None,
        "kubeconfig context to use instead of its current-context",
        metavar="NAME",
    ),
    _Flag(
        "--in-cluster",
        "false",
        "as --kubeconfig, with the pod's ServiceAccount (when running inside the cluster)",
        type=_bool_arg,
        boolean=True,
    ),
    _Flag("--cluster-id", "Kubernetes", "name of the cluster, in object names and logs", "ID"),
    _Flag(
        "--system-namespace",
        "istio-system",
        "namespace of the control plane: mesh ConfigMap, CA Secrets, leader Lease",
        "NS",
    ),
    _Flag(
        "--injection-address",
        "127.0.0.1:15017",
        "HTTPS sidecar injection webhook listen address (on with Kubernetes)",
        "HOST:PORT",
    ),
    _Flag(
        "--injection-template",
        None,
        "sidecar template YAML (a partial Pod) replacing the built-in one",
        metavar="FILE",
        type=Path,
    ),
    _Flag(
        "--lease-duration",
        "30s",
        "advanced: leader election lease; renewals are due within half of it and tried "
        "every quarter (Istio: 30s/15s/7.5s)",
        "DURATION",
        duration_arg,
    ),
    _Flag("--log-format", "console", "log output format", choices=("console", "json")),
    _Flag(
        "--log-level",
        "info",
        "least severe level logged",
        type=str.lower,
        choices=("debug", "info", "warning", "error"),
    ),
)


def _serve_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "serve",
        help="run the control plane (xDS + monitoring)",
        description="Run the control plane. Every flag can also be set through the "
        "environment variable named in its help; a flag given wins over it.",
    )
    for f in _SERVE_FLAGS:
        if f.boolean:
            p.add_argument(
                f.flag, dest=f.dest, action="store_const", const=True, default=None,
                help=f.help_text(),
            )  # fmt: skip
            continue
        p.add_argument(
            f.flag,
            dest=f.dest,
            action="append" if f.repeatable else "store",
            type=f.type,
            choices=f.choices,
            metavar=f.metavar,
            default=None,  # resolved after parsing: flag, then environment, then default
            help=f.help_text(),
        )
    from meshpilot.ca import cli as ca_cli

    ca_cli.add_serve_arguments(p)


def _resolve_env(
    parser: argparse.ArgumentParser, args: argparse.Namespace, environ: Mapping[str, str]
) -> None:
    """Fill each serve flag not given from its MESHPILOT_* variable, else its default."""
    for f in _SERVE_FLAGS:
        if getattr(args, f.dest) is not None:
            continue
        text, source = environ.get(f.env) or None, f.env
        if text is None:
            text, source = f.default, f.flag
        if text is None:
            setattr(args, f.dest, [] if f.repeatable else None)
            continue
        parts = [t for t in text.split(os.pathsep) if t] if f.repeatable else [text]
        values = []
        for part in parts:
            try:
                value = f.type(part)
            except (argparse.ArgumentTypeError, ValueError) as e:
                parser.error(f"{source}={part!r}: {e}")
            if f.choices and value not in f.choices:
                parser.error(f"{source}={part!r}: expected one of {', '.join(f.choices)}")
            values.append(value)
        setattr(args, f.dest, values if f.repeatable else values[0])


def serve_settings(args: argparse.Namespace) -> Settings:
    """The Settings of a parsed (and env-resolved) `meshpilot serve` command line."""
    from meshpilot.ca import cli as ca_cli
    from meshpilot.settings import Settings

    return Settings(
        config_dirs=args.config_dir,
        mesh_config=args.mesh_config,
        xds_address=args.xds_address,
        monitoring_address=args.monitoring_address,
        debounce_after=args.debounce_after,
        debounce_max=args.debounce_max,
        log_format=args.log_format,
        log_level=args.log_level,
        kubeconfig=args.kubeconfig,
        kube_context=args.context,
        in_cluster=args.in_cluster,
        cluster_id=args.cluster_id,
        system_namespace=args.system_namespace,
        injection_address=args.injection_address,
        injection_template=args.injection_template,
        lease_duration=args.lease_duration,
        **ca_cli.settings_kwargs(args),
    )


def version() -> str:
    """The installed distribution's version; the package's own when run from a tree
    that was not installed."""
    import importlib.metadata

    try:
        return importlib.metadata.version("meshpilot")
    except importlib.metadata.PackageNotFoundError:
        return meshpilot.__version__


def build_parser() -> argparse.ArgumentParser:
    from meshpilot.agent import bootstrap
    from meshpilot.agent import command as agent
    from meshpilot.ca import cli as ca_cli

    parser = argparse.ArgumentParser(
        prog="meshpilot", description="An Istio-compatible service mesh control plane."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    bootstrap.register(sub)
    ca_cli.register(sub)
    agent.register(sub)
    return parser


def parse(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Parse a command line; for `serve`, unset flags come from `environ` (os.environ)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        _resolve_env(parser, args, os.environ if environ is None else environ)
    return parser, args


async def _serve(settings: Settings) -> int:
    import asyncio

    from meshpilot.serve import MeshServer, tune_gc

    try:
        server = MeshServer(settings)
    except (OSError, ValueError) as e:
        print(f"meshpilot serve: --mesh-config: {e}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Start-up may wait long (a Kubernetes cluster's first sync, its CA Secrets): a
    # signal meanwhile ends it rather than waiting for it.
    starting = asyncio.create_task(server.start())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await starting
        await server.stop()
        return 0
    stopping.cancel()
    try:
        starting.result()
    except (OSError, ValueError) as e:
        print(f"meshpilot serve: {e}", file=sys.stderr)
        await server.stop()
        return 1
    tune_gc()
    await stop.wait()
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args_given = sys.argv[1:] if argv is None else list(argv)
    if args_given[:1] == ["agent"]:
        from meshpilot.agent import __main__ as agent_main

        # argv None: this process is the command itself, so the agent may trim its
        # imports process-wide (see meshpilot/agent/__main__.py).
        return agent_main.main(args_given[1:], prog="meshpilot agent", whole_process=argv is None)
    parser, args = parse(argv)
    if args.command == "serve":
        import asyncio

        from meshpilot import logs

        settings = serve_settings(args)
        try:
            logs.configure(settings.log_format, settings.log_level)
            settings.validate()
        except ValueError as e:
            parser.error(str(e))
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(_serve(settings))
        return 130
    if args.command == "bootstrap":
        from meshpilot.agent import bootstrap

        return bootstrap.run(args)
    if args.command == "token":
        from meshpilot.ca import cli as ca_cli

        return ca_cli.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
