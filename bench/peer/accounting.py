"""CPU and memory accounting for server process groups, and the run summaries.

A server may be several processes (sovereign: a gunicorn master and its workers), so
every reading is a sum over a fixed list of pids, taken from /proc: utime + stime
from /proc/PID/stat, VmRSS from /proc/PID/status, Pss from /proc/PID/smaps_rollup
(RSS double-counts the pages that forked workers share with their master; PSS
splits them).
"""

from __future__ import annotations

import contextlib
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.procs import cpu_seconds, rss_kb


def children(pid: int) -> list[int]:
    """Direct children of `pid` (all its threads' children)."""
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with (
                contextlib.suppress(FileNotFoundError),
                open(f"/proc/{pid}/task/{tid}/children") as f,
            ):
                out.extend(int(c) for c in f.read().split())
    return out


def process_tree(pid: int, limit: int = 256) -> list[int]:
    """`pid` and its descendants (breadth first, at most `limit` processes)."""
    out = [pid]
    i = 0
    while i < len(out) and len(out) < limit:
        out.extend(children(out[i])[: limit - len(out)])
        i += 1
    return out


def cpu_of(pids: Iterable[int]) -> float:
    """Summed utime + stime (seconds) of the processes still alive."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(pid)
    return total


def pss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def memory_of(pids: Iterable[int]) -> dict[str, int]:
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, PermissionError):
            rss += rss_kb(pid)
            pss += pss_kb(pid)
    return {"rss_kb": rss, "pss_kb": pss}


@dataclass(frozen=True, slots=True)
class Reading:
    """CPU seconds of a process group at a monotonic instant."""

    t: float
    cpu: float


def per_request(before: Reading, after: Reading, n: int, idle_rate: float) -> float:
    """Server CPU seconds per request over a batch of `n` requests, minus what the
    server burns when idle over the same wall time (never below zero)."""
    if n <= 0:
        raise ValueError(f"batch size: expected > 0, got {n}")
    if after.t < before.t:
        raise ValueError("readings out of order")
    busy = (after.cpu - before.cpu) - idle_rate * (after.t - before.t)
    return max(0.0, busy) / n


def idle_rate(before: Reading, after: Reading) -> float:
    """CPU cores used while nothing was asked of the server."""
    span = after.t - before.t
    return max(0.0, (after.cpu - before.cpu) / span) if span > 0 else 0.0


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max of per-run figures."""
    if not values:
        raise ValueError("no values")
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def ratio(peer: float, ours: float) -> float | None:
    """peer / ours; None when ours is zero (nothing to divide by)."""
    return peer / ours if ours > 0 else None
