"""Who is calling: pluggable authenticators for the CA (and the secure ADS port).

An authenticator looks at one call (its metadata and its TLS client certificate) and
returns the caller's SPIFFE identity, returns None when the call carries no
credential of its kind, or raises AuthenticationError when it carries a bad one.
The first authenticator that succeeds wins (Istio's order). An authenticator that has
to ask someone else (the Kubernetes TokenReview one, kubeauth.py) is asynchronous: it
has `authenticate_async` instead, and raises AuthenticatorUnavailable when it cannot get
an answer, which the CA reports as UNAVAILABLE rather than blaming the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshpilot.ca.identity import IdentityError, SpiffeId
from meshpilot.ca.tokens import TokenError, TokenSigner

AUTHORIZATION = "authorization"


class AuthenticationError(Exception):
    """The call carries a credential that does not authenticate; never holds secrets."""


class AuthenticatorUnavailable(Exception):
    """The credential could not be checked (its verifier is unreachable); retryable."""


@dataclass(frozen=True, slots=True)
class CallCredentials:
    """What an authenticator may look at for one call.

    `peer_cert` must already be verified against the CA's roots by the TLS layer
    (the secure port's TLS front does that); authenticators do not re-verify it.
    """

    metadata: Mapping[str, str]
    peer_cert: x509.Certificate | None = None
    peer: str = ""

    @staticmethod
    def metadata_from(pairs: Iterable[tuple[str, str | bytes]]) -> dict[str, str]:
        """gRPC invocation metadata to a dict; a repeated key becomes unusable ("")."""
        out: dict[str, str] = {}
        for key, value in pairs:
            if isinstance(value, bytes):  # binary (-bin) headers are never credentials
                continue
            k = key.lower()
            # Two authorization headers are ambiguous: refuse rather than pick one.
            out[k] = "" if k in out else value
        return out


@dataclass(frozen=True, slots=True)
class Caller:
    identity: SpiffeId
    authenticator: str


class Authenticator(Protocol):
    """One way of proving who the caller is."""

    name: str

    def authenticate(self, call: CallCredentials) -> Caller | None: ...


@runtime_checkable
class AsyncAuthenticator(Protocol):
    """One way of proving who the caller is that needs I/O (e.g. a TokenReview)."""

    name: str

    async def authenticate_async(self, call: CallCredentials) -> Caller | None: ...


AnyAuthenticator = Authenticator | AsyncAuthenticator


def bearer_token(metadata: Mapping[str, str]) -> str | None:
    """The token of `authorization: Bearer <token>`, None if there is no such header."""
    if AUTHORIZATION not in metadata:
        return None
    value = metadata[AUTHORIZATION]
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("authorization metadata is not 'Bearer <token>'")
    return token.strip()


class TokenAuthenticator:
    """Local-mode tokens minted by `meshpilot token create` with this CA directory."""

    name = "token"

    def __init__(self, signer: TokenSigner, trust_domain: str) -> None:
        self._signer = signer
        self._trust_domain = trust_domain

    def authenticate(self, call: CallCredentials) -> Caller | None:
        token = bearer_token(call.metadata)
        if token is None:
            return None
        try:
            claims = self._signer.verify(token)
        except TokenError as e:
            raise AuthenticationError(str(e)) from None
        return Caller(
            SpiffeId(self._trust_domain, claims.namespace, claims.service_account), self.name
        )


class ClientCertAuthenticator:
    """A workload certificate from this CA's trust domain, for renewals and ADS."""

    name = "client-cert"

    def __init__(self, trust_domain: str) -> None:
        self._trust_domain = trust_domain

    def authenticate(self, call: CallCredentials) -> Caller | None:
        if call.peer_cert is None:
            return None
        return Caller(workload_identity(call.peer_cert, self._trust_domain), self.name)


def workload_identity(cert: x509.Certificate, trust_domain: str) -> SpiffeId:
    """The SPIFFE ID of a (TLS-verified) workload certificate; AuthenticationError if
    it is not one: exactly one URI SAN in our trust domain, not a CA, usable as a
    client certificate."""
    try:
        ext = cert.extensions
    except ValueError as e:
        raise AuthenticationError("client certificate extensions do not parse") from e
    try:
        if ext.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise AuthenticationError("client certificate is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
            raise AuthenticationError("client certificate is not valid for client auth")
    except x509.ExtensionNotFound:
        pass
    try:
        san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise AuthenticationError("client certificate has no SPIFFE identity") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise AuthenticationError("client certificate must carry exactly one SPIFFE URI SAN")
    try:
        return SpiffeId.parse(uris[0], trust_domain)
    except IdentityError as e:
        raise AuthenticationError(f"client certificate identity: {e}") from None


def authenticate(authenticators: Sequence[Authenticator], call: CallCredentials) -> Caller:
    """The first success wins; AuthenticationError naming every failure otherwise."""
    errors: list[str] = []
    for auth in authenticators:
        try:
            caller = auth.authenticate(call)
        except AuthenticationError as e:
            errors.append(f"{auth.name}: {e}")
            continue
        if caller is not None:
            return caller
    if not errors:
        raise AuthenticationError(
            "no credential: send 'authorization: Bearer <token>' or a client certificate"
        )
    raise AuthenticationError("; ".join(errors))


async def authenticate_call(
    authenticators: Sequence[AnyAuthenticator], call: CallCredentials
) -> Caller:
    """`authenticate()` for chains with asynchronous authenticators: the first success
    wins; if none succeeds and one could not give an answer, AuthenticatorUnavailable
    (the caller may be fine; retrying later may succeed), else AuthenticationError."""
    errors: list[str] = []
    unavailable: list[str] = []
    for auth in authenticators:
        try:
            if isinstance(auth, AsyncAuthenticator):
                caller = await auth.authenticate_async(call)
            else:
                caller = auth.authenticate(call)
        except AuthenticationError as e:
            errors.append(f"{auth.name}: {e}")
            continue
        except AuthenticatorUnavailable as e:
            unavailable.append(f"{auth.name}: {e}")
            continue
        if caller is not None:
            return caller
    if unavailable:
        raise AuthenticatorUnavailable("; ".join(unavailable + errors))
    if not errors:
        raise AuthenticationError(
            "no credential: send 'authorization: Bearer <token>' or a client certificate"
        )
    raise AuthenticationError("; ".join(errors))
