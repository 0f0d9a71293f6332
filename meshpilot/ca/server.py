"""`istio.v1.auth.IstioCertificateService/CreateCertificate` on grpc.aio.

Every refusal has one gRPC status and is counted:

- RESOURCE_EXHAUSTED: request above 64 KiB. Refused before it is received: by the
  secure port's TLS front from the message's length prefix (h2guard.py; the internal
  server's own gRPC limit must stay larger for ADS requests on the same port), or by
  gRPC's receive limit where the CA has a server of its own; the raw size is checked
  again here, before parsing.
- UNAUTHENTICATED: no, malformed, expired or foreign token; unusable client cert.
- UNAVAILABLE: the credential could not be checked (the API server answering
  TokenReviews is unreachable); the caller may retry.
- PERMISSION_DENIED: a SAN other than the caller's own SPIFFE ID (foreign identity,
  extra DNS/IP/email/URI SANs).
- INVALID_ARGUMENT: unparsable request or PEM, bad CSR signature, CA:TRUE, weak or
  unsupported key, negative validity or above the maximum.
- INTERNAL: the CA itself failed (e.g. its certificate expired).
- DEADLINE_EXCEEDED: no request message within CALL_TIMEOUT of the call's headers.

The method is served as stream-unary, which is the same on the wire as a unary
call, so that the handler runs as soon as the headers arrive: a unary handler
would only run once the message is complete, and a client sending headers and
nothing else would hold its call open forever (istiod's gRPC server has a
per-call deadline for the same reason).

Signing runs inline on the event loop: measured ~0.25 ms for ECDSA P-256 and
~0.85 ms with an RSA-2048 CA key, and `cryptography` keeps the GIL while signing
(two threads were slower than one), so a thread hop would only add latency.

Logs name the peer, the identity and the reason; never tokens, keys or CSRs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import grpc
import structlog
from google.protobuf.message import DecodeError

from meshpilot.ca.auth import (
    AnyAuthenticator,
    AuthenticationError,
    AuthenticatorUnavailable,
    CallCredentials,
    authenticate_call,
)
from meshpilot.ca.authority import (
    CAError,
    CertificateAuthority,
    CsrError,
    IdentityMismatch,
    TtlError,
)
from meshpilot.ca.h2guard import oversized_marker
from meshpilot.monitoring import metrics
from meshpilot.protos import istio_ca_pb2

log = structlog.get_logger(__name__)

SERVICE_NAME = "istio.v1.auth.IstioCertificateService"
METHOD = "CreateCertificate"
METHOD_PATH = f"/{SERVICE_NAME}/{METHOD}"
MAX_REQUEST_BYTES = 64 * 1024
# Time from a call's headers to its request message; a CSR is ~1 KiB, so a client
# that has not sent it by then is stuck or hostile.
CALL_TIMEOUT = 10.0

PeerCertSource = Callable[[grpc.aio.ServicerContext], CallCredentials]


class _Oversized:
    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


class _Malformed:
    __slots__ = ()


def _deserialize(data: bytes) -> istio_ca_pb2.IstioCertificateRequest | _Oversized | _Malformed:
    # Decide on the raw size first: a 200 MiB message is never parsed. A parse error
    # becomes a sentinel so that the handler can count it and answer INVALID_ARGUMENT
    # (an exception here would surface as an uncounted INTERNAL).
    if len(data) > MAX_REQUEST_BYTES:
        return _Oversized(len(data))
    # What the TLS front relays in place of a message above the limit (h2guard).
    declared = oversized_marker(data)
    if declared is not None:
        return _Oversized(declared)
    try:
        return istio_ca_pb2.IstioCertificateRequest.FromString(data)
    except DecodeError:
        return _Malformed()


def record_ca_expiry(ca: CertificateAuthority) -> None:
    """Set Istio's root and chain expiry gauges."""
    metrics.CA_ROOT_CERT_EXPIRY.set(ca.root_expiry.timestamp())
    metrics.CA_CERT_CHAIN_EXPIRY.set(ca.chain_expiry.timestamp())


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class CertificateService:
    """The CSR servicer: authenticate, authorize, validate, sign."""

    def __init__(
        self,
        ca: CertificateAuthority,
        authenticators: Sequence[AnyAuthenticator],
        credentials: PeerCertSource | None = None,
        *,
        call_timeout: float = CALL_TIMEOUT,
    ) -> None:
        self.ca = ca
        self.authenticators = tuple(authenticators)
        self._credentials = credentials or metadata_only
        self.call_timeout = call_timeout
        record_ca_expiry(ca)

    def register(self, server: grpc.aio.Server) -> None:
        handlers = {
            METHOD: grpc.stream_unary_rpc_method_handler(
                self._serve_call,
                request_deserializer=_deserialize,
                response_serializer=istio_ca_pb2.IstioCertificateResponse.SerializeToString,
            )
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    async def _serve_call(
        self,
        requests: AsyncIterator[istio_ca_pb2.IstioCertificateRequest | _Oversized | _Malformed],
        context: grpc.aio.ServicerContext,
    ) -> istio_ca_pb2.IstioCertificateResponse:
        """The first request message within `call_timeout`, then CreateCertificate."""
        try:
            async with asyncio.timeout(self.call_timeout):
                request = await anext(aiter(requests), None)
        except TimeoutError:
            await self._refuse(
                context,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "no_request",
                f"no request message within {self.call_timeout:g}s of the call",
            )
        if request is None:
            await self._refuse(
                context, grpc.StatusCode.INVALID_ARGUMENT, "no_request", "call without a request"
            )
        assert request is not None
        return await self.CreateCertificate(request, context)

    async def _refuse(
        self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, reason: str, message: str
    ) -> None:
        metrics.CA_CSR_REFUSED.labels(code.name, reason).inc()
        log.warning("csr refused", peer=context.peer() or "", reason=reason)
        await context.abort(code, message)

    async def CreateCertificate(
        self,
        request: istio_ca_pb2.IstioCertificateRequest | _Oversized | _Malformed,
        context: grpc.aio.ServicerContext,
    ) -> istio_ca_pb2.IstioCertificateResponse:
        metrics.CA_CSR_COUNT.inc()
        try:
            chain = await self._handle(request, context)
        except _Refused as r:
            metrics.CA_CSR_REFUSED.labels(r.code.name, r.reason).inc()
            # abort() raises: the call ends with this status and the server goes on.
            await context.abort(r.code, str(r))
            raise AssertionError("unreachable") from None
        metrics.CA_CERT_ISSUANCES.inc()
        return istio_ca_pb2.IstioCertificateResponse(cert_chain=chain)

    async def _handle(
        self,
        request: istio_ca_pb2.IstioCertificateRequest | _Oversized | _Malformed,
        context: grpc.aio.ServicerContext,
    ) -> list[str]:
        peer = context.peer() or ""
        if isinstance(request, _Oversized):
            log.warning("csr refused", peer=peer, reason="oversized", size=request.size)
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "oversized",
                f"request of {request.size} bytes is above the {MAX_REQUEST_BYTES} byte limit",
            )
        if isinstance(request, _Malformed):
            metrics.CA_CSR_PARSING_ERRORS.inc()
            log.warning("csr refused", peer=peer, reason="malformed_request")
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT,
                "malformed_request",
                "request is not an IstioCertificateRequest",
            )
        call: CallCredentials | None = None
        try:
            call = self._credentials(context)
            caller = await authenticate_call(self.authenticators, call)
        except (AuthenticatorUnavailable, AuthenticationError) as e:
            # The API server behind an authenticator is down: retry later, not "who are you".
            code, reason = (
                (grpc.StatusCode.UNAVAILABLE, "authenticator_unavailable")
                if isinstance(e, AuthenticatorUnavailable)
                else (grpc.StatusCode.UNAUTHENTICATED, "unauthenticated")
            )
            metrics.CA_AUTHN_FAILURES.inc()
            log.warning(
                "csr refused",
                peer=(call.peer if call else "") or peer,
                reason=reason,
                error=str(e),
            )
            raise _Refused(code, reason, f"request authenticate failure: {e}") from None
        ident = caller.identity
        ttl = request.validity_duration
        try:
            chain = self.ca.sign(request.csr, ident, float(ttl) if ttl else None)
        except CsrError as e:
            metrics.CA_CSR_PARSING_ERRORS.inc()
            self._log_refusal(call, caller.identity, e)
            raise _Refused(
                grpc.StatusCode.INVALID_ARGUMENT, e.reason, f"invalid CSR: {e}"
            ) from None
        except IdentityMismatch as e:
            self._log_refusal(call, caller.identity, e)
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, e.reason, str(e)) from None
        except TtlError as e:
            metrics.CA_CSR_SIGN_ERRORS.labels("TTL_ERROR").inc()
            self._log_refusal(call, caller.identity, e)
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, e.reason, str(e)) from None
        except CAError as e:
            metrics.CA_CSR_SIGN_ERRORS.labels("CERT_GEN_ERROR").inc()
            log.error("csr signing failed", peer=call.peer, identity=str(ident), error=str(e))
            raise _Refused(grpc.StatusCode.INTERNAL, e.reason, f"CSR signing error: {e}") from None
        except Exception:
            metrics.CA_CSR_SIGN_ERRORS.labels("CERT_GEN_ERROR").inc()
            log.exception("csr signing failed", peer=call.peer, identity=str(ident))
            raise _Refused(grpc.StatusCode.INTERNAL, "internal", "CSR signing error") from None
        # Debug, as istiod logs it: at hundreds of CSRs per second an info line per
        # certificate costs more CPU than checking the CSR.
        log.debug(
            "certificate issued",
            peer=call.peer or peer,
            identity=str(ident),
            authn=caller.authenticator,
            ttl=ttl or self.ca.default_ttl,
        )
        return chain

    @staticmethod
    def _log_refusal(call: CallCredentials, ident: object, e: CAError) -> None:
        log.warning(
            "csr refused", peer=call.peer, identity=str(ident), reason=e.reason, error=str(e)
        )


def metadata_only(context: grpc.aio.ServicerContext) -> CallCredentials:
    """Credentials from metadata alone (no TLS peer information)."""
    return CallCredentials(
        CallCredentials.metadata_from(context.invocation_metadata() or ()),
        None,
        context.peer() or "",
    )
