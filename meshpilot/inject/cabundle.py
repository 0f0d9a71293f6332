"""Keep the injector webhooks' caBundle equal to the mesh root, as istiod's leader does.

The API server checks the webhook's serving certificate against `caBundle` in the
MutatingWebhookConfiguration `istio-sidecar-injector`; without it every call fails and,
with failurePolicy Fail, pods in injected namespaces cannot be created. Istio's
webhook patcher (pkg/webhooks) watches that configuration and writes the root into every
webhook that points at istiod. `CABundlePatcher` does the same for the webhooks whose
`clientConfig.service` is one of the control plane's Services in its namespace; webhooks
given by URL or pointing elsewhere are left alone.

Each write is a JSON Patch that first tests the object's resourceVersion and the
webhook's name at that index, so a concurrent change (another replica, `kubectl apply`)
makes it fail instead of writing into the wrong webhook; the patcher reads again and
retries. Only `caBundle` is written: fields this client's models do not know survive.
It watches the one configuration by name, so RBAC can limit it to that name, and
repairs a caBundle that someone removed (re-applying the manifests does) within a
watch event. Run it on the leader only; it runs until cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import random
from collections.abc import Sequence
from typing import Any

import aiohttp
import structlog
from kubernetes_asyncio import watch
from kubernetes_asyncio.client import AdmissionregistrationV1Api, ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

log = structlog.get_logger(__name__)

WEBHOOK_CONFIG = "istio-sidecar-injector"
# Server-side watch timeouts are spread so replicas do not all re-list at once.
WATCH_TIMEOUT = (240, 360)
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 30.0
# Writes lost to concurrent changes in a row before backing off.
CONFLICT_RETRIES = 5


class CABundlePatcher:
    """Writes `root_pem` into the caBundle of the injector's webhooks, and keeps it there."""

    def __init__(
        self,
        api: ApiClient,
        root_pem: str,
        *,
        namespace: str = "istio-system",
        services: Sequence[str] = ("istiod", "meshpilot"),
        name: str = WEBHOOK_CONFIG,
        backoff: tuple[float, float] = (BACKOFF_INITIAL, BACKOFF_MAX),
    ) -> None:
        self._api = AdmissionregistrationV1Api(api)
        self._client = api
        self.namespace = namespace
        self.services = frozenset(services)
        self.name = name
        self._bundle = _encode(root_pem)
        self._root_changed = asyncio.Event()
        self._backoff = backoff
        self.patches = 0  # writes made, for logs and tests

    @property
    def what(self) -> str:
        return f"MutatingWebhookConfiguration {self.name}"

    def set_root(self, root_pem: str) -> None:
        """A new mesh root (CA rotation): written at once by a running patcher."""
        bundle = _encode(root_pem)
        if bundle != self._bundle:
            self._bundle = bundle
            self._root_changed.set()

    async def patch_once(self) -> str:
        """Bring the configuration up to date; returns the resourceVersion to watch from.

        A missing configuration is not an error: the watch picks up its creation.
        """
        for attempt in range(1, CONFLICT_RETRIES + 1):
            listed = await self._api.list_mutating_webhook_configuration(
                field_selector=f"metadata.name={self.name}"
            )
            items = [self._client.sanitize_for_serialization(o) for o in listed.items]
            if not items:
                log.info("webhook configuration not found; waiting for it", config=self.what)
                return str(listed.metadata.resource_version)
            ops = self.patch_for(items[0])
            if not ops:
                return str(items[0]["metadata"]["resourceVersion"])
            try:
                # A list body goes out as application/json-patch+json (the client picks
                # the patch type from the body's type).
                out = await self._api.patch_mutating_webhook_configuration(self.name, ops)
            except ApiException as e:
                # 409: resourceVersion moved; 422: a test op failed (the list changed).
                if e.status in (409, 422) and attempt < CONFLICT_RETRIES:
                    log.info(
                        "webhook configuration changed while patching; again", config=self.what
                    )
                    continue
                raise
            self.patches += 1
            log.info("webhook caBundle written", config=self.what, webhooks=(len(ops) - 1) // 2)
            return str(out.metadata.resource_version)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def patch_for(self, config: dict[str, Any]) -> list[dict[str, Any]]:
        """The JSON Patch that sets our caBundle where it differs ([] when none does)."""
        rv = config.get("metadata", {}).get("resourceVersion")
        ops: list[dict[str, Any]] = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv}
        ]
        for i, hook in enumerate(config.get("webhooks") or []):
            client = hook.get("clientConfig") or {}
            service = client.get("service") or {}
            if (
                service.get("namespace") != self.namespace
                or service.get("name") not in self.services
            ):
                continue
            if client.get("caBundle") == self._bundle:
                continue
            ops.append({"op": "test", "path": f"/webhooks/{i}/name", "value": hook.get("name")})
            ops.append(
                {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": self._bundle}
            )
        return ops if len(ops) > 1 else []

    async def run(self) -> None:
        """Patch, then watch and patch again on every change, until cancelled."""
        delay = self._backoff[0]
        while True:
            try:
                self._root_changed.clear()
                rv = await self.patch_once()
                await self._wait_for_change(rv)
                delay = self._backoff[0]
            except ApiException as e:
                if e.status == 410:
                    continue  # the watch's revision is gone: read again
                delay = await self._pause(delay, f"{e.status} {e.reason}")
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                delay = await self._pause(delay, str(e) or type(e).__name__)

    async def _pause(self, delay: float, error: str) -> float:
        wait = delay / 2 + random.uniform(0, delay / 2)
        log.warning(
            "webhook caBundle not kept; retrying",
            config=self.what,
            error=error,
            retry_in=round(wait, 1),
        )
        await asyncio.sleep(wait)
        return min(delay * 2, self._backoff[1])

    async def _wait_for_change(self, rv: str) -> None:
        """Returns on the first change to the configuration, a new root, or a watch timeout."""
        watcher = asyncio.ensure_future(self._next_event(rv))
        rooted = asyncio.ensure_future(self._root_changed.wait())
        try:
            done, _ = await asyncio.wait({watcher, rooted}, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                watcher.result()  # re-raise a watch failure
        finally:
            for task in (watcher, rooted):
                task.cancel()
            await asyncio.gather(watcher, rooted, return_exceptions=True)

    async def _next_event(self, rv: str) -> None:
        w = watch.Watch()
        try:
            stream = w.stream(
                self._api.list_mutating_webhook_configuration,
                field_selector=f"metadata.name={self.name}",
                resource_version=rv,
                timeout_seconds=random.randint(*WATCH_TIMEOUT),
                allow_watch_bookmarks=True,
            )
            async for event in stream:
                if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                    return
        finally:
            await w.close()


def _encode(root_pem: str) -> str:
    if "-----BEGIN CERTIFICATE-----" not in root_pem:
        raise ValueError("caBundle: expected PEM certificates")
    return base64.b64encode(root_pem.encode()).decode("ascii")
