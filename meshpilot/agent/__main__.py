"""`python -m meshpilot.agent ...`: the agent alone, without the control plane's imports.

Same flags as `meshpilot agent` (which `meshpilot.cli` hands to `main` here before it
imports anything else). Istio's pilot-agent is a Go binary of a few tens of MB; this
process runs next to every Envoy too, so it loads only what it uses: no pydantic, no
config models, no CA signer, no cryptography library (see meshpilot/agent/pki.py) and
none of the optional system libraries it has no use for (`_without_unused_libraries`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence

from meshpilot.agent import PKI_HELPER_MODULE

# Optional standard-library modules that link system libraries the agent never uses:
# libssl/libcrypto (gRPC brings its own TLS, BoringSSL; keys are made by the helper
# process) and libbz2/liblzma (the agent compresses nothing).
UNUSED_OPTIONAL_MODULES = ("ssl", "_ssl", "_hashlib", "bz2", "_bz2", "lzma", "_lzma")


def _without_unused_libraries() -> None:
    """Make importing UNUSED_OPTIONAL_MODULES fail in this process unless already loaded.

    asyncio imports `ssl`, hashlib `_hashlib`, and shutil (through tempfile) `bz2` and
    `lzma` when they can: ~4.5 MB of resident memory each time an agent starts, for
    nothing. Each of them treats the ImportError as "not available" (asyncio then has
    no TLS, hashlib falls back to its built-in digests, shutil offers no bz2/xz
    archives). Only done when this process is the agent, never inside a host process
    (a test) that may need them.
    """
    for name in UNUSED_OPTIONAL_MODULES:
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
        _without_unused_libraries()
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
