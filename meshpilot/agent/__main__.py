"""`python -m meshpilot.agent ...`: the agent alone, without the control plane's imports.

Same flags as `meshpilot agent`; this entry point keeps the resident memory of the
process that runs next to every Envoy smaller (no pydantic, no config models).
"""

from __future__ import annotations

import argparse
import sys

from meshpilot.agent import command


def main(argv: list[str] | None = None) -> int:
    prog = "python -m meshpilot.agent"
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True)
    command.register(sub)
    sub.choices["agent"].prog = prog
    args = parser.parse_args(["agent", *(sys.argv[1:] if argv is None else argv)])
    return command.run(args)


if __name__ == "__main__":
    sys.exit(main())
