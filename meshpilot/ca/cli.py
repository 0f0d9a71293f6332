"""Command-line pieces of the CA: `serve` flags and `meshpilot token create`."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from meshpilot import envflags
from meshpilot.ca.identity import IdentityError
from meshpilot.ca.tokens import TokenSigner
from meshpilot.durations import parse_duration


def parse_ttl(text: str) -> float:
    """A duration such as `24h`, `90m` or `2160h`; `90d` (days) is accepted too."""
    t = text.strip()
    if t.endswith("d") and t[:-1].isdigit():
        return int(t[:-1]) * 86400.0
    return parse_duration(t)


def ttl_arg(text: str) -> float:
    """argparse type for TTLs; must be positive."""
    try:
        value = parse_ttl(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """`meshpilot serve` flags for the CA and the secure port."""
    env = os.environ.get
    p.add_argument(
        "--ca-dir",
        type=Path,
        default=env("MESHPILOT_CA_DIR") or None,
        metavar="DIR",
        help="run the CA and the secure port: Istio plug-in files in DIR (ca-cert.pem, "
        "ca-key.pem, root-cert.pem, cert-chain.pem) or a self-signed root created there "
        "(default: none: no CA, except with Kubernetes, where the CA comes from the Secrets "
        "cacerts or istio-ca-secret; env MESHPILOT_CA_DIR)",
    )
    p.add_argument(
        "--trust-domain",
        default=env("MESHPILOT_TRUST_DOMAIN") or None,
        metavar="TD",
        help="SPIFFE trust domain (default: the mesh config's trustDomain, cluster.local; "
        "env MESHPILOT_TRUST_DOMAIN)",
    )
    p.add_argument(
        "--secure-xds-address",
        default=env("MESHPILOT_SECURE_XDS_ADDRESS", "127.0.0.1:15012"),
        metavar="HOST:PORT",
        help="TLS address serving the CA and ADS, with --ca-dir or Kubernetes (default: "
        "127.0.0.1:15012; "
        "env MESHPILOT_SECURE_XDS_ADDRESS)",
    )
    p.add_argument(
        "--workload-cert-ttl",
        type=ttl_arg,
        default=ttl_arg(env("MESHPILOT_WORKLOAD_CERT_TTL", "24h")),
        metavar="DURATION",
        help="validity of workload certificates when the CSR asks for none (default: 24h; "
        "env MESHPILOT_WORKLOAD_CERT_TTL)",
    )
    p.add_argument(
        "--max-workload-cert-ttl",
        type=ttl_arg,
        default=ttl_arg(env("MESHPILOT_MAX_WORKLOAD_CERT_TTL", "2160h")),
        metavar="DURATION",
        help="longest validity a CSR may ask for; DURATION or days such as 90d (default: "
        "2160h = 90d; env MESHPILOT_MAX_WORKLOAD_CERT_TTL)",
    )


def settings_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The Settings fields that `add_serve_arguments` parsed."""
    return {
        "ca_dir": args.ca_dir,
        "trust_domain": args.trust_domain,
        "secure_xds_address": args.secure_xds_address,
        "workload_cert_ttl": args.workload_cert_ttl,
        "max_workload_cert_ttl": args.max_workload_cert_ttl,
    }


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `meshpilot token create`."""
    p = subparsers.add_parser("token", help="bearer tokens for the CA (local mode)")
    tsub = p.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser(
        "create",
        help="print a token that authenticates NAMESPACE/SERVICE_ACCOUNT to the CA of DIR",
        description="Print a bearer token for `meshpilot agent --token-file`. The signing "
        "secret is DIR/token-signing.key (created on first use, mode 0600).",
    )
    c.add_argument(
        "--ca-dir",
        type=Path,
        required=True,
        metavar="DIR",
        help="the directory of serve --ca-dir",
    )
    c.add_argument("--namespace", required=True, help="the workload's namespace")
    c.add_argument("--service-account", required=True, help="the workload's ServiceAccount")
    c.add_argument(
        "--ttl", type=ttl_arg, default=3600.0, metavar="DURATION", help="lifetime (default: 1h)"
    )
    envflags.bind_environment(c)


def run(args: argparse.Namespace) -> int:
    """Print the token on stdout (nothing else), errors on stderr with status 2."""
    try:
        signer = TokenSigner.from_ca_dir(args.ca_dir)
        token = signer.create(args.namespace, args.service_account, args.ttl)
    except (IdentityError, ValueError) as e:
        print(f"meshpilot token create: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"meshpilot token create: --ca-dir {args.ca_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(token)
    return 0
