"""Kubernetes ServiceAccount tokens as CSR credentials, checked with a TokenReview.

What Istio does (security/pkg/server/ca/authenticate/kubeauth): a workload's agent sends
its projected ServiceAccount token (audience `istio-ca`) as `authorization: Bearer`;
istiod posts an authentication.k8s.io/v1 TokenReview with audiences ["istio-ca"], and
when the API server says authenticated, takes the identity from the username
`system:serviceaccount:NS:SA` as spiffe://TRUST_DOMAIN/ns/NS/sa/SA. The CSR's SAN must
then be exactly that identity (checked by the CA: another identity is PERMISSION_DENIED).

meshpilot does the same, and:

- caches answers by the token's SHA-256 (never the token): successes for `cache_ttl`
  (60 s) but never past the token's own `exp`, refusals for a shorter time, in a bounded
  LRU; concurrent CSRs with one token share a single TokenReview;
- reports an API server that cannot answer (unreachable, timeout, 429/5xx, or 401/403
  because istiod's own credentials or RBAC are wrong) as AuthenticatorUnavailable, so
  the CSR fails with UNAVAILABLE and the agent retries, instead of UNAUTHENTICATED;
- never logs a token: logs carry an 8-character prefix of its hash.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import structlog
from kubernetes_asyncio.client import (
    ApiClient,
    AuthenticationV1Api,
    V1TokenReview,
    V1TokenReviewSpec,
)
from kubernetes_asyncio.client.exceptions import ApiException

from meshpilot.ca.auth import (
    AuthenticationError,
    AuthenticatorUnavailable,
    CallCredentials,
    Caller,
    bearer_token,
)
from meshpilot.ca.identity import IdentityError, SpiffeId

log = structlog.get_logger(__name__)

ISTIO_CA_AUDIENCE = "istio-ca"
SA_PREFIX = "system:serviceaccount:"
CACHE_TTL = 60.0
# Refusals are remembered briefly: enough to blunt a client hammering with a bad token,
# short enough that a token used just before its creation propagated works soon after.
NEGATIVE_CACHE_TTL = 5.0
CACHE_SIZE = 10_000
REVIEW_TIMEOUT = 5.0
# Projected tokens are ~1 KiB; anything far larger is not one (and is not sent on).
MAX_TOKEN_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class _Answer:
    expires: float
    caller: Caller | None
    error: str = ""


class KubeJWTAuthenticator:
    """An AsyncAuthenticator: ServiceAccount bearer tokens, verified by TokenReview."""

    name = "kube-jwt"

    def __init__(
        self,
        api: ApiClient,
        trust_domain: str,
        *,
        audiences: Sequence[str] = (ISTIO_CA_AUDIENCE,),
        cache_ttl: float = CACHE_TTL,
        negative_cache_ttl: float = NEGATIVE_CACHE_TTL,
        cache_size: int = CACHE_SIZE,
        review_timeout: float = REVIEW_TIMEOUT,
    ) -> None:
        self._api = AuthenticationV1Api(api)
        self.trust_domain = trust_domain
        self.audiences = list(audiences)
        self.cache_ttl = cache_ttl
        self.negative_cache_ttl = min(negative_cache_ttl, cache_ttl)
        self.cache_size = cache_size
        self.review_timeout = review_timeout
        self._cache: OrderedDict[str, _Answer] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[_Answer]] = {}
        # TokenReviews sent, for tests and debugging.
        self.reviews = 0

    async def authenticate_async(self, call: CallCredentials) -> Caller | None:
        token = bearer_token(call.metadata)
        if token is None:
            return None
        if len(token) > MAX_TOKEN_BYTES:
            raise AuthenticationError(f"bearer token larger than {MAX_TOKEN_BYTES} bytes")
        key = hashlib.sha256(token.encode()).hexdigest()
        answer = self._cached(key)
        if answer is None:
            answer = await self._review_once(key, token)
        if answer.caller is None:
            raise AuthenticationError(answer.error)
        return answer.caller

    def _cached(self, key: str) -> _Answer | None:
        answer = self._cache.get(key)
        if answer is None:
            return None
        if answer.expires <= time.monotonic():
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return answer

    async def _review_once(self, key: str, token: str) -> _Answer:
        """One TokenReview per token at a time; concurrent callers share its answer.

        The review runs as a task of its own: a caller that gives up (its call was
        cancelled) neither cancels it for the others nor loses the answer for the cache.
        """
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._review_and_remember(key, token))
            self._inflight[key] = task
            task.add_done_callback(lambda t: self._done(key, t))
        return await asyncio.shield(task)

    def _done(self, key: str, task: asyncio.Task[_Answer]) -> None:
        self._inflight.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: a failure nobody awaited is not an error to report

    async def _review_and_remember(self, key: str, token: str) -> _Answer:
        answer = await self._review(key, token)
        if answer.caller is not None:
            # A token the API server accepts now must not outlive its own expiry here.
            exp = token_expiry(token)
            if exp is not None:
                until = time.monotonic() + (exp - time.time())
                answer = _Answer(min(answer.expires, until), answer.caller)
        self._remember(key, answer)
        return answer

    async def _review(self, key: str, token: str) -> _Answer:
        body = V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=V1TokenReviewSpec(token=token, audiences=self.audiences),
        )
        short = key[:8]
        self.reviews += 1
        try:
            async with asyncio.timeout(self.review_timeout):
                review: V1TokenReview = await self._api.create_token_review(body)
        except TimeoutError:
            raise self._unavailable(short, f"no answer within {self.review_timeout:g}s") from None
        except ApiException as e:
            raise self._unavailable(short, f"{e.status} {e.reason}") from None
        except (aiohttp.ClientError, OSError) as e:
            raise self._unavailable(short, str(e) or type(e).__name__) from None
        return self._judge(review, short)

    def _unavailable(self, short: str, why: str) -> AuthenticatorUnavailable:
        log.warning("token review failed", token_sha256=short, error=why)
        return AuthenticatorUnavailable(f"TokenReview failed: {why}")

    def _judge(self, review: V1TokenReview, short: str) -> _Answer:
        now = time.monotonic()
        status = review.status
        if status is None or not status.authenticated:
            # The API server's reason names audiences or expiry, never the token.
            reason = ((status.error if status else "") or "token not authenticated")[:200]
            log.info("token review refused", token_sha256=short, error=reason)
            return _Answer(now + self.negative_cache_ttl, None, f"TokenReview: {reason}")
        granted = status.audiences or []
        if granted and not set(granted) & set(self.audiences):
            return _Answer(
                now + self.negative_cache_ttl,
                None,
                f"token audiences {granted} do not include {self.audiences}",
            )
        username = (status.user.username if status.user else "") or ""
        if not username.startswith(SA_PREFIX):
            return _Answer(now + self.negative_cache_ttl, None, "not a ServiceAccount token")
        ns, sep, sa = username[len(SA_PREFIX) :].partition(":")
        try:
            if not sep:
                raise IdentityError(f"malformed ServiceAccount user {username!r}")
            identity = SpiffeId(self.trust_domain, ns, sa)  # validates each part
        except IdentityError as e:
            return _Answer(now + self.negative_cache_ttl, None, str(e))
        return _Answer(now + self.cache_ttl, Caller(identity, self.name))

    def _remember(self, key: str, answer: _Answer) -> None:
        self._cache[key] = answer
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)


def token_expiry(token: str) -> float | None:
    """The `exp` claim (Unix time) of a JWT, read without verifying it; None if absent."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1] + "=" * (-len(parts[1]) % 4)
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload))
    except (binascii.Error, ValueError):
        return None
    exp = claims.get("exp") if isinstance(claims, dict) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
