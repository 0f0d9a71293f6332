"""Render a mesh config template with `${NAME}` taken from the environment.

docker-compose.yml gives every container a static address from a variable
(`${REVIEWS_V1_IP:-198.18.0.12}`), but Compose interpolates only its own file, not
the mesh config it mounts. The control plane container therefore renders
examples/compose-mesh/workloads.yaml.tmpl with the same variables before
`meshpilot serve` starts, so WorkloadEntry addresses always equal the containers'.

    python -m meshpilot.demo.render TEMPLATE OUTPUT

A variable the template names but the environment lacks is an error naming the
template, the line and the variable; nothing is written then.
"""

from __future__ import annotations

import argparse
import os
import string
import sys
from collections.abc import Mapping
from pathlib import Path

MAX_TEMPLATE_BYTES = 1 << 20


class RenderError(ValueError):
    pass


def render(text: str, env: Mapping[str, str], origin: str) -> str:
    """`text` with every `${NAME}` replaced; `$$` is a literal `$`."""
    out = []
    # Line by line (a placeholder never spans lines), so that errors name the line.
    for lineno, line in enumerate(text.splitlines(keepends=True), 1):
        template = string.Template(line)
        for name in template.get_identifiers():
            if name not in env:
                raise RenderError(f"{origin} line {lineno}: ${{{name}}} is not set")
        try:
            out.append(template.substitute(env))
        except ValueError as e:  # a `$` not followed by a name or `{name}`
            raise RenderError(f"{origin} line {lineno}: a lone $; write $$ for a literal $") from e
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshpilot.demo.render")
    parser.add_argument("template", type=Path)
    parser.add_argument("output", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.template.stat().st_size > MAX_TEMPLATE_BYTES:
            raise RenderError(f"{args.template}: larger than {MAX_TEMPLATE_BYTES} bytes")
        text = render(args.template.read_text(), os.environ, str(args.template))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: the file watcher never reads a half-written file.
        tmp = args.output.with_name(f".{args.output.name}.tmp")
        tmp.write_text(text)
        tmp.replace(args.output)
    except (OSError, RenderError) as e:
        print(f"render: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
