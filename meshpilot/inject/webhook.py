"""The sidecar injection webhook: HTTPS `POST /inject` answering AdmissionReviews.

As Istio's istiod (port 15017, reached through the `istiod` Service's port 443): the API
server sends an `admission.k8s.io/v1` AdmissionReview for each pod the
MutatingWebhookConfiguration selected, and gets back an AdmissionReview of the same
apiVersion whose `response` has the request's `uid`, `allowed: true` and, when a sidecar
is added, `patchType: JSONPatch` with the RFC 6902 patch base64-encoded in `patch`.

Where meshpilot differs: Istio answers a review it cannot decode, or a pod it fails to
inject, with `allowed: false` (so, with failurePolicy Fail, the pod is refused).
meshpilot never refuses a pod: a malformed review, a pod the template cannot be applied
to, or any fault of the handler is answered `allowed: true` without a patch, logged as a
warning and reported to the user as an admission warning (kubectl prints it). A body
without a uid cannot be answered in a way the API server accepts, but only a client
other than the API server sends one. Size is the one refusal: a body over
`MAX_REVIEW_BYTES` is answered 413 without being read whole, and the API server then
applies the webhook's failurePolicy. The limit is above the API server's own 3 MiB
request limit, so it only stops clients that are not the API server.

The serving certificate comes from the caller (the mesh CA's `issue_server_cert`, with
the SANs `istiod.NS.svc` and `meshpilot.NS.svc`) and can be replaced while serving with
`set_certificate`: new connections get the new one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from meshpilot.inject import metrics
from meshpilot.inject.patch import (
    InjectionError,
    ProxySettings,
    injection_patch,
    injection_required,
)
from meshpilot.inject.template import Template, TemplateError
from meshpilot.secretfile import secret_file

log = structlog.get_logger(__name__)

INJECT_PATH = "/inject"
DEFAULT_ADDRESS = "127.0.0.1:15017"
MAX_REVIEW_BYTES = 4 * 1024 * 1024
# The API server gives a webhook 10 s by default; a body still arriving after that is
# not from it.
READ_TIMEOUT = 10.0
# Kubernetes shortens admission warnings past 120 characters.
MAX_WARNING = 120
_API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")
_POD = {"group": "", "version": "v1", "kind": "Pod"}
# A Kubernetes uid is a 36-character UUID; anything much longer is not one.
_MAX_UID = 128


class MalformedReview(ValueError):
    """The body is not a usable AdmissionReview for a pod."""


class InjectionWebhook:
    """Serves `POST /inject` over HTTPS; `start(host, port)`, then `stop()`."""

    def __init__(
        self,
        template_path: Path | None,
        proxy: ProxySettings,
        cert_chain_pem: str | Sequence[str],
        key_pem: str,
    ) -> None:
        # A broken template fails here, at startup, naming the file and the field.
        self.template = Template.load(template_path)
        self.proxy = proxy
        self._ssl = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ssl.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ssl.set_alpn_protocols(["http/1.1"])
        self.set_certificate(cert_chain_pem, key_pem)
        self._runner: web.AppRunner | None = None

    def set_certificate(self, cert_chain_pem: str | Sequence[str], key_pem: str) -> None:
        """Serve this chain from the next handshake on (e.g. before the old one expires)."""
        chain = cert_chain_pem if isinstance(cert_chain_pem, str) else "".join(cert_chain_pem)
        with secret_file(chain + key_pem, "meshpilot-webhook-tls") as path:
            self._ssl.load_cert_chain(path)

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port); returns the bound port."""
        app = web.Application(client_max_size=MAX_REVIEW_BYTES)
        app.router.add_post(INJECT_PATH, self._handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=self._ssl, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = int(runner.addresses[0][1]) if runner.addresses else port
        log.info("injection webhook listening", address=f"{host}:{bound}", path=INJECT_PATH)
        return bound

    async def stop(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                body = await request.read()
        except TimeoutError:
            return web.Response(status=408, text="request body not received in time\n")
        # 413 for an oversized body is raised by request.read() itself.
        return web.json_response(self.review(body))

    def review(self, body: bytes) -> dict[str, Any]:
        """The AdmissionReview answering `body`; never raises."""
        api_version, uid = _API_VERSIONS[0], ""
        metrics.REQUESTS.inc()
        try:
            review = _decode(body)
            api_version = _api_version(review)
            uid, request = _request(review)
            return self._answer(api_version, uid, request)
        except MalformedReview as e:
            metrics.FAILURES.labels("decode").inc()
            log.warning("malformed AdmissionReview: allowed without a sidecar", error=str(e))
            return _response(api_version, uid, warning=f"sidecar not injected: {e}")
        except Exception as e:
            # The webhook must not stand between a user and their pod because of a fault
            # here; the error's type and text are ours, not the pod's contents.
            metrics.FAILURES.labels("internal").inc()
            log.warning(
                "injection failed: allowed without a sidecar",
                error=f"{type(e).__name__}: {str(e)[:200]}",
            )
            return _response(api_version, uid, warning="sidecar not injected: internal error")

    def _answer(self, api_version: str, uid: str, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("kind") != _POD or request.get("operation", "CREATE") != "CREATE":
            # Only pod creation is registered; anything else passes untouched.
            metrics.SKIPS.inc()
            return _response(api_version, uid)
        pod = request.get("object")
        if not isinstance(pod, dict):
            raise MalformedReview("request.object: expected a Pod object")
        meta = pod.get("metadata")
        if not isinstance(meta, dict) or not isinstance(pod.get("spec"), dict):
            # The patch adds below both: without them it would not apply.
            raise MalformedReview("request.object: expected a Pod with metadata and spec")
        namespace = request.get("namespace") or meta.get("namespace") or "default"
        if not isinstance(namespace, str):
            raise MalformedReview("request.namespace: expected a string")
        who = f"Pod {namespace}/{_pod_name(meta)}"
        decision, opt_warning = injection_required(pod, namespace)
        if opt_warning:
            log.warning("injection opt-in value ignored", pod=who, reason=opt_warning)
        if not decision.inject:
            log.info("sidecar injection skipped", pod=who, reason=decision.reason)
            metrics.SKIPS.inc()
            return _response(api_version, uid)
        try:
            ops = injection_patch(pod, namespace, self.template, self.proxy)
        except (InjectionError, TemplateError) as e:
            log.warning("sidecar not injected", pod=who, error=str(e))
            metrics.FAILURES.labels("inject").inc()
            return _response(api_version, uid, warning=f"sidecar not injected: {e}")
        log.info("sidecar injected", pod=who, reason=decision.reason)
        metrics.SUCCESSES.inc()
        return _response(api_version, uid, patch=ops)


def _decode(body: bytes) -> dict[str, Any]:
    try:
        review = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedReview(f"body is not JSON: {e}") from None
    except RecursionError:
        raise MalformedReview("body is nested too deeply") from None
    if not isinstance(review, dict):
        raise MalformedReview("body: expected a JSON object (an AdmissionReview)")
    return review


def _api_version(review: dict[str, Any]) -> str:
    api_version = review.get("apiVersion")
    if api_version not in _API_VERSIONS or review.get("kind") != "AdmissionReview":
        raise MalformedReview(
            f"apiVersion/kind: expected {_API_VERSIONS[0]} AdmissionReview, "
            f"got {str(api_version)[:64]!r}/{str(review.get('kind'))[:64]!r}"
        )
    return str(api_version)


def _request(review: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    request = review.get("request")
    if not isinstance(request, dict):
        raise MalformedReview("request: expected an object")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid or len(uid) > _MAX_UID:
        raise MalformedReview("request.uid: expected a non-empty string")
    return uid, request


def _response(
    api_version: str,
    uid: str,
    *,
    patch: list[dict[str, Any]] | None = None,
    warning: str | None = None,
) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(patch, separators=(",", ":")).encode()
        ).decode("ascii")
    if warning:
        text = f"meshpilot: {warning}"
        response["warnings"] = [
            text if len(text) <= MAX_WARNING else text[: MAX_WARNING - 3] + "..."
        ]
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}


def _pod_name(meta: dict[str, Any]) -> str:
    """The pod's name, or its generateName prefix when the name is not chosen yet."""
    name = meta.get("name")
    if isinstance(name, str) and name:
        return name[:253]
    generate = meta.get("generateName")
    if isinstance(generate, str) and generate:
        return f"{generate[:253]}*"
    return "(unnamed)"
