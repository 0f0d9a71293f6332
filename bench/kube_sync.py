"""The Kubernetes source against a large cluster: initial sync, then a relist after 410.

    python -m bench.kube_sync [--objects 3000] [--out bench/results/kube-sync.json]

Starts the API server emulator (tests/kube/apiserver.py) as a child process on a free
loopback port, with its control endpoint, and creates N Services, N EndpointSlices and
N Pods in one namespace through the real client. Then, in this process:

- `sync`: a KubeSource starts on an empty store; the time until `synced` and the CPU this
  process spent meanwhile (paginated lists at 500 per page, validation, store commits).
- `relist`: history is compacted and every watch cut, so the Pod and EndpointSlice
  informers (whose resume version is older than the compaction) get 410 and relist all
  N of their objects. Reported: the time until both relisted, and how many store
  changes that caused (0 expected: nothing changed, so nothing is announced).

The emulator is stopped by its pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config

from meshpilot.config import kinds
from meshpilot.discovery.kube.source import KubeSource
from meshpilot.discovery.store import ConfigStore

REPO = Path(__file__).resolve().parents[1]
NS = "bench"


async def seed(api: client.ApiClient, n: int) -> None:
    core = client.CoreV1Api(api)
    discovery = client.DiscoveryV1Api(api)
    await core.create_namespace({"metadata": {"name": NS}})
    gate = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with gate:
            await core.create_namespaced_service(
                NS,
                {
                    "metadata": {"name": f"svc-{i}"},
                    "spec": {"selector": {"app": f"svc-{i}"}, "ports": [{"port": 9080}]},
                },
            )
            await discovery.create_namespaced_endpoint_slice(
                NS,
                {
                    "metadata": {
                        "name": f"svc-{i}-a",
                        "labels": {"kubernetes.io/service-name": f"svc-{i}"},
                    },
                    "addressType": "IPv4",
                    "endpoints": [{"addresses": [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"]}],
                    "ports": [{"name": "http", "port": 9080, "protocol": "TCP"}],
                },
            )
            await core.create_namespaced_pod(
                NS,
                {
                    "metadata": {"name": f"svc-{i}-pod", "labels": {"app": f"svc-{i}"}},
                    "spec": {"containers": [{"name": "app", "image": "app"}]},
                },
            )

    await asyncio.gather(*(one(i) for i in range(n)))


async def run(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.kube.apiserver",
            "--kubeconfig",
            str(kubeconfig),
            "--control-port",
            "0",
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            ready = json.loads(await proc.stdout.readline())
            api = await config.new_client_from_config(config_file=str(kubeconfig))
            try:
                return await measure(api, ready["control"], n)
            finally:
                await api.close()
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def measure(api: client.ApiClient, control: str, n: int) -> dict[str, Any]:
    started = time.monotonic()
    await seed(api, n)
    seeded = time.monotonic() - started
    store = ConfigStore()
    changes: list[int] = []
    store.subscribe(lambda keys: changes.append(len(keys)))
    source = KubeSource(store, api)
    cpu0, t0 = time.process_time(), time.monotonic()
    await source.start()
    await source.synced.wait()
    sync_s, sync_cpu = time.monotonic() - t0, time.process_time() - cpu0
    counts = store.object_counts()
    assert counts.get(kinds.POD) == n and counts.get(kinds.ENDPOINT_SLICE) == n
    pods, slices = source.informer(kinds.POD), source.informer(kinds.ENDPOINT_SLICE)
    assert pods is not None and slices is not None
    lists_before = pods.lists + slices.lists
    changes.clear()
    async with aiohttp.ClientSession() as http:
        # One write moves the revision past the Pod and EndpointSlice informers' versions.
        await client.CoreV1Api(api).create_namespaced_config_map(NS, {"metadata": {"name": "tick"}})
        await asyncio.sleep(0.5)
        t1, cpu1 = time.monotonic(), time.process_time()
        await (await http.post(f"{control}/compact")).read()
        await (await http.post(f"{control}/cut-watches")).read()
        async with asyncio.timeout(60):
            while pods.lists + slices.lists < lists_before + 2:  # noqa: ASYNC110 - counters
                await asyncio.sleep(0.01)
        relist_s, relist_cpu = time.monotonic() - t1, time.process_time() - cpu1
    await source.stop()
    return {
        "objects_per_kind": n,
        "seed_s": round(seeded, 2),
        "sync_s": round(sync_s, 3),
        "sync_cpu_s": round(sync_cpu, 3),
        "store_objects": sum(counts.values()),
        "relist_s": round(relist_s, 3),
        "relist_cpu_s": round(relist_cpu, 3),
        "relist_store_changes": sum(changes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/kube-sync.json")
    args = parser.parse_args()
    result = asyncio.run(run(args.objects))
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
