"""A Kubernetes API server emulator for tests: HTTPS, bearer tokens, real wire semantics.

What it implements, following the Kubernetes API conventions and kube-apiserver's behaviour:

- HTTPS on 127.0.0.1 (a fresh CA and serving certificate per emulator), bearer-token
  authentication (401 Status without a valid token), and `write_kubeconfig()` so the real
  `kubernetes_asyncio` client connects to it exactly as to a cluster.
- Discovery: /api, /api/v1, /apis (APIGroupList with preferredVersion), /apis/GROUP,
  /apis/GROUP/VERSION (APIResourceList with namespaced, kind, verbs, shortNames and the
  /status subresources), /version, /healthz.
- Resources: core v1 namespaces, services, pods, nodes, configmaps, secrets, serviceaccounts;
  discovery.k8s.io/v1 endpointslices; coordination.k8s.io/v1 leases;
  admissionregistration.k8s.io/v1 mutatingwebhookconfigurations;
  authentication.k8s.io/v1 tokenreviews (create only); apiextensions.k8s.io/v1
  customresourcedefinitions (read-only: the CRDs of the served Istio kinds); Istio's
  networking.istio.io (v1, v1beta1, v1alpha3) and security.istio.io (v1, v1beta1) custom
  resources. Which Istio
  versions are served is configurable (`served_versions`); one stored object is visible through
  every served version of its group, with apiVersion rendered per request.
- One etcd-like revision counter; per-object uid, resourceVersion, creationTimestamp, labels,
  annotations, and generation where the real strategy keeps one (custom resources: bumped on
  any non-metadata change; EndpointSlices: also on label changes; other built-in kinds here
  carry none, as on a real server).
- list: namespaced and across namespaces, labelSelector (=, ==, !=, in, notin, exists, !exists,
  gt, lt), fieldSelector (metadata.name, metadata.namespace, plus the few fields each built-in
  kind supports; others are 400), limit/continue served from a consistent snapshot (410 once
  compacted), resourceVersion "" / "0" / N, resourceVersionMatch NotOlderThan / Exact, a 504
  "Too large resource version" after a wait for a revision from the future. A list with
  resourceVersion=0 is answered whole, ignoring limit, as the watch cache does.
- watch (?watch=true): newline-delimited JSON events; synthetic ADDED for the current state
  when resourceVersion is "" or "0" (or sendInitialEvents=true, closed by a bookmark annotated
  `k8s.io/initial-events-end`); resume from any retained revision; an ERROR event with a 410
  Expired Status for revisions older than the compaction horizon; timeoutSeconds; BOOKMARK
  events every `bookmark_interval` seconds when allowWatchBookmarks=true; selectors applied
  to events (an object that stops matching is sent as DELETED, one that starts as ADDED).
- create (201, 409 AlreadyExists, 404 when the namespace does not exist, generateName,
  dryRun=All), get, update (409 Conflict on a stale resourceVersion; without one, accepted for
  kinds whose strategy allows unconditional updates and 422 for leases and custom resources;
  create-on-PUT for services, serviceaccounts and leases), JSON merge patch and JSON patch,
  /status subresources (the main resource cannot change status, the subresource only status),
  delete (Status or the deleted object, per kind; preconditions), deletecollection. A write
  that changes nothing keeps its revision and sends no event.
- TokenReview against a table of ServiceAccount tokens (`add_service_account_token`).
- Strictness: every error is a v1 Status; malformed parameters are 400, unknown ones ignored;
  unknown resources 404; request bodies other than JSON/YAML 415; bodies over 3 MiB 413;
  Lease times that are not MicroTimes (exactly six fractional digits) 400, as Go parses them.
- Fault injection for chaos tests, in process: `cut_watches()`, `compact()`, `stop()` /
  `start()` on the same port with the same state, `delay`, `fail_next()`, `fail_fraction()`,
  and `requests`, a count of requests by (verb, resource). The same over HTTP when run as
  `python -m tests.kube.apiserver --kubeconfig PATH [--port N] [--control-port N]`
  (tests/kube/control.py); it prints one JSON line with its URLs when ready.

What it deliberately does not do: authorization (RBAC), admission webhooks, server-side apply
and strategic merge patch (both 415, so a client that works here uses patch types every
server accepts), protobuf, field validation against OpenAPI schemas, finalizers and graceful
deletion (deletes, including a namespace's contents, happen at once), owner-reference
garbage collection, TokenRequest, the deprecated /watch/ paths, aggregated discovery, and the
periodic compaction of a real cluster (history is kept up to `max_events` or until
`compact()`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from tests.kube import tls
from tests.kube.discovery import NOT_FOUND, discovery_document
from tests.kube.objects import Obj, StatusError, bad_request, status_body
from tests.kube.resources import (
    Registry,
    ResourceType,
    builtin_types,
    crd_for,
    istio_types,
)
from tests.kube.rest import (
    JSON_PATCH,
    MERGE_PATCH,
    PATCH_TYPES,
    Rest,
    parse_bool,
    parse_int,
    render,
)
from tests.kube.store import Store
from tests.kube.watch import serve_watch

MAX_BODY = 3 * 1024 * 1024
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
API_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
CRDS = ("apiextensions.k8s.io", "customresourcedefinitions")
_BODY_TYPES = ("application/json", "application/yaml")
_FAULT_REASONS = {500: "InternalError", 503: "ServiceUnavailable", 429: "TooManyRequests"}


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json")


class ApiServer:
    """An in-process kube-apiserver emulator; `await start()`, then point a client at it."""

    def __init__(
        self,
        served_versions: Mapping[str, Sequence[str]] | None = None,
        token: str = "emulator-admin-token",
        bookmark_interval: float = 60.0,
        too_large_rv_wait: float = 3.0,
        max_events: int = 50_000,
        api_audiences: Sequence[str] = (API_AUDIENCE,),
        namespaces: Sequence[str] = (*DEFAULT_NAMESPACES, "istio-system"),
    ) -> None:
        self.registry = Registry(builtin_types() + istio_types(served_versions))
        self.store = Store(max_events=max_events)
        namespaces_rt = self.registry.lookup("", "v1", "namespaces")
        assert namespaces_rt is not None
        self.rest = Rest(
            self.store,
            namespaces_rt,
            self.registry.types,
            tuple(api_audiences),
            too_large_rv_wait,
        )
        self.tokens = {token}
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.cert = tls.make_serving_cert()
        self.port = 0
        self._runner: web.AppRunner | None = None
        # Fault injection and observation.
        self.delay = 0.0
        self.requests: Counter[tuple[str, str]] = Counter()
        self._fail_next = 0
        self._fail_code = 500
        self._fail_fraction = 0.0
        self._rng = random.Random(0)
        for name in namespaces:
            self.create("", "v1", "namespaces", {"metadata": {"name": name}})
        for rt in self.registry.types:
            if rt.custom:
                crd, status = crd_for(rt)
                created = self.create(CRDS[0], "v1", CRDS[1], crd)
                self.set_status(CRDS[0], "v1", CRDS[1], "", created["metadata"]["name"], status)

    # -- lifecycle --

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Listen on 127.0.0.1: a free port the first time, the same port after stop()."""
        if self._runner is not None:
            return
        app = web.Application(client_max_size=MAX_BODY + 64 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5
        )
        await runner.setup()
        site = web.TCPSite(
            runner,
            "127.0.0.1",
            self.port,
            ssl_context=self.cert.ssl_context(),
        )
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Close every connection and the listening socket; state is kept for start()."""
        if self._runner is None:
            return
        self.store.close_watchers("server stopped", abort=True)
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> ApiServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    def kubeconfig(
        self, context: str = "emulator", namespace: str = "default"
    ) -> dict[str, object]:
        return tls.kubeconfig(self.url, self.cert.ca_pem, self.token, context, namespace)

    def write_kubeconfig(
        self, path: Path, context: str = "emulator", namespace: str = "default"
    ) -> Path:
        return tls.write_kubeconfig(path, self.kubeconfig(context, namespace))

    # -- state, bypassing HTTP (for seeding and for checking what a client wrote) --

    def _rt(self, group: str, version: str, resource: str) -> ResourceType:
        rt = self.registry.lookup(group, version, resource)
        if rt is None:
            raise KeyError(f"{group}/{version}/{resource} is not served")
        return rt

    def create(self, group: str, version: str, resource: str, obj: Obj) -> Obj:
        """Create through the same rules as POST (namespace taken from the object)."""
        rt = self._rt(group, version, resource)
        body = {"apiVersion": rt.api_version(version), "kind": rt.kind, **obj}
        return self.rest.create(rt, version, obj.get("metadata", {}).get("namespace", ""), body)

    def get(self, group: str, version: str, resource: str, namespace: str, name: str) -> Obj | None:
        rt = self._rt(group, version, resource)
        obj = self.store.get(rt.group_resource, (namespace if rt.namespaced else "", name))
        return None if obj is None else render(rt, version, obj)

    def set_status(
        self, group: str, version: str, resource: str, namespace: str, name: str, status: Obj
    ) -> Obj:
        """Write status as a controller (kubelet, another istiod) would, via /status."""
        rt = self._rt(group, version, resource)
        current = self.get(group, version, resource, namespace, name)
        if current is None:
            raise KeyError(f"{resource} {namespace}/{name} does not exist")
        current["status"] = status
        _, out = self.rest.update(rt, version, namespace, name, current, "status")
        return out

    def delete(self, group: str, version: str, resource: str, namespace: str, name: str) -> None:
        rt = self._rt(group, version, resource)
        self.rest.delete(rt, version, namespace, name, None, dry_run=False)

    def add_service_account_token(
        self,
        namespace: str,
        service_account: str,
        audiences: Sequence[str] = (),
        token: str | None = None,
    ) -> str:
        """A token TokenReview accepts as `system:serviceaccount:NS:SA` for `audiences`."""
        return self.rest.add_token(namespace, service_account, audiences, token)

    def revoke_token(self, token: str) -> None:
        self.rest.sa_tokens.pop(token, None)

    # -- faults --

    def cut_watches(self, abort: bool = False) -> int:
        """End every open watch now: cleanly (the stream ends) or by resetting the connection."""
        return self.store.close_watchers("cut by the test", abort=abort)

    def compact(self, rv: int | None = None) -> int:
        """Forget history up to `rv` (default: now); older watches and continues get 410."""
        return self.store.compact(rv)

    def send_bookmarks(self) -> None:
        for watcher in self.store.watchers:
            watcher.bookmark_requested = True
            watcher.wakeup.set()

    def fail_next(self, count: int, code: int = 500) -> None:
        self._fail_next, self._fail_code = count, code

    def fail_fraction(self, fraction: float, code: int = 500, seed: int = 0) -> None:
        self._fail_fraction, self._fail_code = fraction, code
        self._rng = random.Random(seed)

    def clear_faults(self) -> None:
        self.delay, self._fail_next, self._fail_fraction = 0.0, 0, 0.0

    def _injected_failure(self) -> StatusError | None:
        if self._fail_next > 0:
            self._fail_next -= 1
        elif not (self._fail_fraction and self._rng.random() < self._fail_fraction):
            return None
        reason = _FAULT_REASONS.get(self._fail_code, "InternalError")
        return StatusError(self._fail_code, reason, "Internal error occurred: injected fault")

    # -- HTTP --

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._dispatch(request)
        except StatusError as exc:
            return json_response(exc.body(), exc.code)
        except web.HTTPRequestEntityTooLarge:
            return json_response(
                status_body(
                    413, "RequestEntityTooLarge", f"Request entity too large: limit is {MAX_BODY}"
                ),
                413,
            )

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        # Authentication comes first: an anonymous caller learns nothing about what exists.
        routed: StatusError | None = None
        try:
            target = self._route(request.method, parts, request.query)
        except StatusError as exc:
            target, routed = None, exc
        if target is not None:
            verb, rt, sub = target[0], target[1], target[5]
            self.requests[(verb, f"{rt.resource}/{sub}" if sub else rt.resource)] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self._authenticated(request.headers.get("Authorization", "")):
            raise StatusError(401, "Unauthorized", "Unauthorized")
        failure = self._injected_failure()
        if failure is not None:
            raise failure
        if routed is not None:
            raise routed
        if target is None:
            if request.method != "GET":
                raise StatusError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                )
            return self._discovery(parts)
        return await self._resource(request, *target)

    def _authenticated(self, header: str) -> bool:
        if not header.startswith("Bearer "):
            return False
        token = header[len("Bearer ") :]
        if token in self.tokens:
            return True
        # A ServiceAccount token is good for the API when bound to one of its audiences.
        entry = self.rest.sa_tokens.get(token)
        return entry is not None and any(a in self.rest.api_audiences for a in entry.audiences)

    def _route(
        self, method: str, parts: list[str], query: Mapping[str, str]
    ) -> tuple[str, ResourceType, str, str, str, str] | None:
        """(verb, type, version, namespace, name, subresource) for resource paths, else None."""
        if parts[:2] == ["api", "v1"] and len(parts) > 2:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) > 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace, name, sub = "", "", ""
        if rest[0] == "namespaces" and len(rest) > 1:
            if len(rest) == 2 or rest[2] in ("status", "finalize"):
                resource, name, sub, extra = "namespaces", rest[1], "/".join(rest[2:3]), rest[3:]
            else:
                namespace, resource = rest[1], rest[2]
                name, sub, extra = "/".join(rest[3:4]), "/".join(rest[4:5]), rest[5:]
        else:
            resource, name, sub, extra = rest[0], "/".join(rest[1:2]), "/".join(rest[2:3]), rest[3:]
        rt = self.registry.lookup(group, version, resource)
        if (
            rt is None
            or extra
            or (namespace and not rt.namespaced)
            or (rt.namespaced and name and not namespace)
            or (sub and not (sub == "status" and rt.status_subresource))
        ):
            raise StatusError(404, "NotFound", NOT_FOUND, {})
        if method == "GET":
            verb = "get" if name else ("watch" if parse_bool(query, "watch") else "list")
        else:
            verb = {
                ("POST", False): "create",
                ("PUT", True): "update",
                ("PATCH", True): "patch",
                ("DELETE", True): "delete",
                ("DELETE", False): "deletecollection",
            }.get((method, bool(name)), "")
        if not verb or verb not in rt.verbs or (sub and verb not in ("get", "update", "patch")):
            raise StatusError(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        return verb, rt, version, namespace, name, sub

    async def _read_body(self, request: web.Request, allowed: Sequence[str]) -> Any:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if not content_type:
            content_type = allowed[0]
        if content_type not in allowed:
            raise StatusError(
                415,
                "UnsupportedMediaType",
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(allowed)}",
            )
        raw = await request.read()
        if len(raw) > MAX_BODY:
            raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=len(raw))
        try:
            if content_type == "application/yaml":
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise bad_request(f"the request body is not valid {content_type}: {exc}") from None

    async def _resource(
        self,
        request: web.Request,
        verb: str,
        rt: ResourceType,
        version: str,
        namespace: str,
        name: str,
        sub: str,
    ) -> web.StreamResponse:
        query = request.query
        dry_run_values = query.getall("dryRun", [])
        if any(v != "All" for v in dry_run_values):
            raise bad_request(
                f'dryRun: Unsupported value: {dry_run_values}: supported values: "All"'
            )
        dry_run = bool(dry_run_values)
        match verb:
            case "get":
                return json_response(self.rest.get(rt, version, namespace, name))
            case "list":
                limit = parse_int(query, "limit")
                parse_int(query, "timeoutSeconds")
                return json_response(
                    await self.rest.list(rt, version, namespace, query, max(limit, 0))
                )
            case "watch":
                return await serve_watch(self, request, rt, version, namespace)
            case "create":
                body = await self._read_body(request, _BODY_TYPES)
                return json_response(self.rest.create(rt, version, namespace, body, dry_run), 201)
            case "update":
                body = await self._read_body(request, _BODY_TYPES)
                code, out = self.rest.update(rt, version, namespace, name, body, sub, dry_run)
                return json_response(out, code)
            case "patch":
                content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
                if content_type not in PATCH_TYPES:
                    raise StatusError(
                        415,
                        "UnsupportedMediaType",
                        f"the body of the request was in an unknown format - accepted media types "
                        f"include: {JSON_PATCH}, {MERGE_PATCH}",
                    )
                patch = await self._read_body(request, (content_type,))
                out = self.rest.patch(
                    rt, version, namespace, name, content_type, patch, sub, dry_run
                )
                return json_response(out)
            case "delete":
                options = None
                if request.can_read_body:
                    options = await self._read_body(request, _BODY_TYPES)
                    if options is not None and not isinstance(options, dict):
                        raise bad_request("DeleteOptions: expected an object")
                    if isinstance(options, dict) and "All" in (options.get("dryRun") or []):
                        dry_run = True
                return json_response(
                    self.rest.delete(rt, version, namespace, name, options, dry_run)
                )
            case "deletecollection":
                return json_response(
                    self.rest.delete_collection(rt, version, namespace, query, dry_run)
                )
        raise AssertionError(verb)

    def _discovery(self, parts: list[str]) -> web.Response:
        if parts in (["healthz"], ["livez"], ["readyz"]):
            return web.Response(text="ok")
        return json_response(discovery_document(self.registry, self.port, parts))


async def _main() -> None:
    from tests.kube.control import start_control

    parser = argparse.ArgumentParser(description="Run the Kubernetes API server emulator.")
    parser.add_argument("--port", type=int, default=0, help="API port on 127.0.0.1 (0: free)")
    parser.add_argument("--kubeconfig", type=Path, required=True, help="where to write it")
    parser.add_argument(
        "--control-port", type=int, default=None, help="fault-injection endpoint (0: free)"
    )
    parser.add_argument("--bookmark-interval", type=float, default=60.0)
    args = parser.parse_args()
    server = ApiServer(bookmark_interval=args.bookmark_interval)
    server.port = args.port
    await server.start()
    control = None
    if args.control_port is not None:
        control, control_port = await start_control(server, args.control_port)
    server.write_kubeconfig(args.kubeconfig)
    # One line a parent process can wait for.
    ready = {"server": server.url, "kubeconfig": str(args.kubeconfig)}
    if control is not None:
        ready["control"] = f"http://127.0.0.1:{control_port}"
    print(json.dumps(ready), flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await stopping.wait()
    finally:
        if control is not None:
            await control.cleanup()
        await server.stop()


if __name__ == "__main__":
    asyncio.run(_main())
