"""The `meshpilot` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from meshpilot import logs
from meshpilot.agent import bootstrap
from meshpilot.agent import command as agent
from meshpilot.ca import cli as ca_cli
from meshpilot.durations import duration_arg
from meshpilot.settings import Settings


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    env = Settings.env_default
    p = sub.add_parser("serve", help="run the control plane (xDS + monitoring)")
    p.add_argument(
        "--config-dir",
        action="append",
        type=Path,
        default=[],
        metavar="DIR",
        help="directory of Kubernetes/Istio YAML or JSON, watched for changes (repeatable)",
    )
    p.add_argument("--mesh-config", type=Path, metavar="FILE", help="Istio MeshConfig YAML")
    p.add_argument("--xds-address", default=env("XDS_ADDRESS", "127.0.0.1:15010"))
    p.add_argument("--monitoring-address", default=env("MONITORING_ADDRESS", "127.0.0.1:15014"))
    p.add_argument(
        "--debounce-after",
        type=duration_arg,
        default=duration_arg(env("DEBOUNCE_AFTER", "100ms")),
        metavar="DURATION",
    )
    p.add_argument(
        "--debounce-max",
        type=duration_arg,
        default=duration_arg(env("DEBOUNCE_MAX", "10s")),
        metavar="DURATION",
    )
    p.add_argument(
        "--log-format", choices=("console", "json"), default=env("LOG_FORMAT", "console")
    )
    p.add_argument("--log-level", default=env("LOG_LEVEL", "info"))
    ca_cli.add_serve_arguments(p)


async def _serve(settings: Settings) -> int:
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
    try:
        await server.start()
    except (OSError, ValueError) as e:
        print(f"meshpilot serve: {e}", file=sys.stderr)
        await server.stop()
        return 1
    tune_gc()
    await stop.wait()
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="meshpilot", description="An Istio-compatible service mesh control plane."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    bootstrap.register(sub)
    ca_cli.register(sub)
    agent.register(sub)
    args = parser.parse_args(argv)
    if args.command == "serve":
        settings = Settings(
            config_dirs=args.config_dir,
            mesh_config=args.mesh_config,
            xds_address=args.xds_address,
            monitoring_address=args.monitoring_address,
            debounce_after=args.debounce_after,
            debounce_max=args.debounce_max,
            log_format=args.log_format,
            log_level=args.log_level,
            **ca_cli.settings_kwargs(args),
        )
        try:
            logs.configure(settings.log_format, settings.log_level)
            settings.validate()
        except ValueError as e:
            parser.error(str(e))
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(_serve(settings))
        return 130
    if args.command == "bootstrap":
        return bootstrap.run(args)
    if args.command == "token":
        return ca_cli.run(args)
    if args.command == "agent":
        return agent.run(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
