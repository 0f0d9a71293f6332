"""Summaries of py-spy's raw (collapsed stack) output: where the control plane's time goes.

    python -m bench.profile bench/results/profile-sotw-1000x1000-push.txt

Each line of the input is `frame;frame;...;leaf COUNT`, a frame being
`function (path:line)`. Prints the functions with the most samples on top of the stack
(self) and anywhere in it (inclusive), by share of all samples.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


def _key(frame: str) -> str:
    """`function (module/file.py)` without the line number; site-packages trimmed."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    # Any checkout (main tree or a worktree): keep the path from the package down.
    for package in ("/meshpilot/", "/bench/"):
        if package in path:
            path = package[1:] + path.split(package, 1)[1]
            break
    return f"{m['func']} ({path})"


def summarize(path: Path, top: int = 30) -> dict[str, Any]:
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_key(f) for f in stack.split(";") if f]
        # py-spy puts the thread (and process) name first; keep only code frames.
        frames = [f for f in frames if "(" in f]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n

    def share(c: Counter[str]) -> list[list[Any]]:
        return [[k, round(100 * v / total, 1)] for k, v in c.most_common(top)] if total else []

    return {"samples": total, "self_pct": share(self_c), "inclusive_pct": share(incl_c)}


def main() -> None:
    for arg in sys.argv[1:]:
        s = summarize(Path(arg))
        print(f"{arg}: {s['samples']} samples")
        for title, key in (("self", "self_pct"), ("inclusive", "inclusive_pct")):
            print(f"  top by {title} time:")
            for name, pct in s[key]:
                print(f"    {pct:5.1f}%  {name}")


if __name__ == "__main__":
    main()
