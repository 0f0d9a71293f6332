"""`python -m meshpilot.agent ...`: the agent alone, without the control plane's imports.

Same flags as `meshpilot agent` (which `meshpilot.cli` hands to `main` here before it
imports anything else). Istio's pilot-agent is a Go binary of a few tens of MB; this
process runs next to every Envoy too, so it loads only what it uses: no pydantic, no
config models, no CA signer, and not the system's OpenSSL (see `_without_system_openssl`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence

from meshpilot.agent import PKI_HELPER_MODULE

# Standard-library modules that link the system's libssl/libcrypto, which the agent never
# uses: gRPC brings its own TLS (BoringSSL) and `cryptography` its own OpenSSL.
SYSTEM_OPENSSL_MODULES = ("ssl", "_ssl", "_hashlib")


def _without_system_openssl() -> None:
    """Make importing `ssl` and `_hashlib` fail in this process unless already loaded.

    asyncio imports `ssl` and `secrets` imports `_hashlib` (through `hmac`) when they
    can, which maps the system's libssl and libcrypto: ~4 MB of resident memory each
    time an agent starts. Both callers treat the ImportError as "not available" (asyncio
    then has no TLS, hmac and hashlib fall back to their built-in digests). Only done
    when this process is the agent, never inside a host process (a test) that may need
    them.
    """
    for name in SYSTEM_OPENSSL_MODULES:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


def main(
    argv: Sequence[str] | None = None,
    prog: str = "python -m meshpilot.agent",
    whole_process: bool | None = None,
) -> int:
    """Parse the agent's flags and run it; the exit status.

    `whole_process`: this process exists only to be the agent (default: when `argv` is
    None, i.e. read from the command line), so process-wide trimming is allowed.
    """
    spare = None
    if whole_process if whole_process is not None else argv is None:
        _without_system_openssl()
        # The key helper for the first certificate loads cryptography on the other core
        # while this process loads gRPC (meshpilot/agent/pkiclient.py).
        spare = subprocess.Popen(
            [sys.executable, "-m", PKI_HELPER_MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
    # After the trimming above: these import asyncio, gRPC and protobuf.
    from meshpilot.agent import command, pkiclient

    try:
        if spare is not None:
            pkiclient.adopt_spare(spare)
        parser = argparse.ArgumentParser(prog=prog)
        sub = parser.add_subparsers(dest="command", required=True)
        command.register(sub)
        sub.choices["agent"].prog = prog
        args = parser.parse_args(["agent", *(sys.argv[1:] if argv is None else argv)])
        return command.run(args)
    finally:
        pkiclient.discard_spare()


if __name__ == "__main__":
    sys.exit(main())
