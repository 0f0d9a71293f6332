"""Config analysis cost at scale: what the server pays after each push.

The mesh of bench/scope_gen.py (N services, each with a DestinationRule of 3 subsets,
a VirtualService with a weighted split, and WorkloadEntries) plus a namespace-wide
STRICT PeerAuthentication, so that every analyzer has work. Measures, on one core,
a full analysis (after a config change), the config-only and endpoint-only parts,
and FindingsReporter.update on an endpoint-only context (which reuses the config
findings).

    python -m bench.analysis_bench [--services 1000] [--endpoints 3] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import structlog

from meshpilot.analysis import analyze, config_findings, endpoint_findings
from meshpilot.analysis.reporter import FindingsReporter
from meshpilot.api.mesh import MeshConfig
from meshpilot.api.parse import parse_text
from meshpilot.config import ConfigKey, kinds
from meshpilot.discovery.store import ConfigStore
from meshpilot.model.push_context import PushContext

from .scope_gen import mesh_yaml

STRICT = (
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
    "metadata: {name: default, namespace: bench}\nspec: {mtls: {mode: STRICT}}\n"
)


def _best_ms(fn: Callable[[Any], object], rounds: int, setup: Callable[[], Any] = dict) -> float:
    best = float("inf")
    for _ in range(rounds):
        arg = setup()
        t0 = time.process_time()
        fn(arg)
        best = min(best, time.process_time() - t0)
    return round(best * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=1000)
    ap.add_argument("--endpoints", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--labelled",
        action="store_true",
        help="WorkloadEntries carry security.istio.io/tlsMode: istio (no MP0007)",
    )
    args = ap.parse_args()

    mesh = mesh_yaml(args.services, args.endpoints)
    if args.labelled:
        mesh = mesh.replace("labels: {app: ", "labels: {security.istio.io/tlsMode: istio, app: ")
    result = parse_text(mesh + "---\n" + STRICT, "bench")
    assert not result.errors, result.errors[:3]
    store = ConfigStore()
    store.set_origin("bench", result.configs)
    push = PushContext.build(store.snapshot(), MeshConfig())
    findings = analyze(push)
    # An endpoint-only context, as a WorkloadEntry change (a new address) makes it.
    assert "address: 10.0.0.1," in mesh  # svc0-0, from scope_gen
    moved = mesh.replace("address: 10.0.0.1,", "address: 10.250.0.1,", 1)
    store.set_origin("bench", parse_text(moved + "---\n" + STRICT, "bench").configs)
    key = ConfigKey(kinds.WORKLOAD_ENTRY, "bench", "svc0-0")
    endpoint_only = push.with_endpoint_changes(store.snapshot(), frozenset({key}))
    assert endpoint_only.changed_hosts, "the bench change must move an endpoint"

    def primed() -> FindingsReporter:
        reporter = FindingsReporter()
        with structlog.testing.capture_logs():  # thousands of findings: not to stdout
            reporter.update(push)
        return reporter

    def update(reporter: FindingsReporter) -> None:
        with structlog.testing.capture_logs():
            reporter.update(endpoint_only)

    out = {
        "services": args.services,
        "workload_entries": args.services * args.endpoints,
        "findings": len(findings),
        "full_analysis_ms": _best_ms(lambda _: analyze(push), args.rounds),
        "config_part_ms": _best_ms(lambda _: config_findings(push), args.rounds),
        "endpoint_part_ms": _best_ms(lambda _: endpoint_findings(push), args.rounds),
        "endpoint_only_push_ms": _best_ms(update, args.rounds, primed),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
