"""Local-mode bearer tokens for CSR authentication (`meshpilot token create`).

A token is a compact JWS (JWT) signed with HMAC-SHA256 under a random 32-byte secret
kept in the CA directory (`token-signing.key`, mode 0600, created on first use).
Encoding, signing and signature checks are PyJWT's, with the algorithm pinned to
HS256 (never the token's choice) and every claim required.

Why HMAC rather than ES256 with the CA key: only the CA itself ever verifies these
tokens, so a public verification key buys nothing; the CA key stays dedicated to
certificates (a plug-in CA key may be RSA and must not sign other things); and
verification is a constant-time MAC compare (~2 us) instead of an ECDSA verify
(~60 us) on every CSR. Anyone who can read the secret can mint tokens, but that
person can already read the CA key next to it.

Claims: iss `meshpilot-ca`, sub `system:serviceaccount:NS:SA` (the Kubernetes form,
so the TokenReview authenticator can produce the same caller), aud `istio-ca`
(Istio's default CA audience), iat, nbf, exp, jti. Tokens are bearer credentials
reusable until they expire; there is no revocation list (rotate the secret file to
revoke them all).

Time policy: iat and nbf may be up to LEEWAY seconds in the future (clock skew
between the minting host and the CA); exp gets no leeway, so a token is never
accepted after the moment it names. PyJWT applies one leeway to all three and
reads the clock itself, so the times are checked here after its decode.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from meshpilot.ca.files import ensure_private_dir, write_atomic
from meshpilot.ca.identity import IdentityError, check_namespace, check_service_account

SECRET_FILE = "token-signing.key"
ISSUER = "meshpilot-ca"
AUDIENCE = "istio-ca"
SUBJECT_PREFIX = "system:serviceaccount:"
ALGORITHM = "HS256"
REQUIRED_CLAIMS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti")
MAX_TOKEN_BYTES = 4096
MAX_TTL = 366 * 86400.0
# Tolerated clock difference between the minting host and the CA (iat and nbf only).
LEEWAY = 60
_SECRET_BYTES = 32
_DECODE_OPTIONS: Any = {
    "require": list(REQUIRED_CLAIMS),
    "verify_signature": True,
    "verify_aud": True,
    "verify_iss": True,
    # Times are checked in verify() (see the module docstring).
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
}


class TokenError(Exception):
    """A token that does not authenticate anyone; the message never contains it."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    namespace: str
    service_account: str
    issued_at: int
    expires_at: int
    token_id: str


class TokenSigner:
    """Mints and verifies tokens under one secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < _SECRET_BYTES:
            raise ValueError(f"token secret must be at least {_SECRET_BYTES} bytes")
        self._secret = secret
        # The key id lets a foreign token (another CA directory) be told apart from a
        # tampered one in logs, without revealing anything about the secret.
        self.key_id = hashlib.sha256(b"meshpilot-token-kid:" + secret).hexdigest()[:16]

    @classmethod
    def from_ca_dir(cls, ca_dir: Path, *, create: bool = True) -> TokenSigner:
        """The signer of `ca_dir`, creating its secret on first use."""
        path = ca_dir / SECRET_FILE
        if not path.exists():
            if not create:
                raise FileNotFoundError(f"{path}: no token secret (run `meshpilot token create`)")
            ensure_private_dir(ca_dir)
            # Exclusive: the server and the CLI may both create it at once; first wins.
            write_atomic(path, secrets.token_bytes(_SECRET_BYTES), 0o600, exclusive=True)
        secret = path.read_bytes()
        if len(secret) < _SECRET_BYTES:
            raise ValueError(f"{path}: token secret is shorter than {_SECRET_BYTES} bytes")
        return cls(secret)

    def create(
        self, namespace: str, service_account: str, ttl: float, *, now: float | None = None
    ) -> str:
        """A token for `system:serviceaccount:NAMESPACE:SERVICE_ACCOUNT`."""
        check_namespace(namespace)
        check_service_account(service_account)
        if not 0 < ttl <= MAX_TTL:
            raise ValueError(f"token TTL must be > 0 and at most {int(MAX_TTL // 86400)} days")
        iat = int(now if now is not None else time.time())
        claims = {
            "iss": ISSUER,
            "sub": f"{SUBJECT_PREFIX}{namespace}:{service_account}",
            "aud": AUDIENCE,
            "iat": iat,
            "nbf": iat,
            "exp": iat + int(ttl),
            "jti": secrets.token_hex(16),
        }
        return self.sign(claims)

    def sign(self, claims: dict[str, Any]) -> str:
        """`claims` as a token under this secret (create() builds the claims)."""
        return jwt.encode(
            claims, self._secret, algorithm=ALGORITHM, headers={"typ": "JWT", "kid": self.key_id}
        )

    def verify(self, token: str, *, now: float | None = None) -> TokenClaims:
        """Check signature, issuer, audience and times; raises TokenError."""
        if not isinstance(token, str) or len(token) > MAX_TOKEN_BYTES or not token.isascii():
            raise TokenError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as e:
            raise TokenError("malformed token") from e
        if header.get("alg") != ALGORITHM or header.get("typ", "JWT") != "JWT":
            # Never let the token pick its algorithm ("none", RS256 with our secret...).
            raise TokenError("unsupported token algorithm")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=ISSUER,
                options=_DECODE_OPTIONS,
            )
        except jwt.InvalidSignatureError:
            if header.get("kid") != self.key_id:
                raise TokenError("token was not issued by this CA") from None
            raise TokenError("bad token signature") from None
        except jwt.InvalidIssuerError:
            raise TokenError("wrong token issuer") from None
        except jwt.InvalidAudienceError:
            raise TokenError("wrong token audience") from None
        except jwt.MissingRequiredClaimError as e:
            raise TokenError(f"token has no {e.claim!r} claim") from None
        except jwt.InvalidAlgorithmError:
            raise TokenError("unsupported token algorithm") from None
        except jwt.InvalidTokenError:
            raise TokenError("malformed token") from None
        iat, exp, nbf = claims.get("iat"), claims.get("exp"), claims.get("nbf")
        if not all(type(v) is int for v in (iat, exp, nbf)):
            raise TokenError("malformed token times")
        assert isinstance(iat, int) and isinstance(exp, int) and isinstance(nbf, int)
        t = now if now is not None else time.time()
        if exp <= t:
            raise TokenError("token expired")
        if nbf > t + LEEWAY or iat > t + LEEWAY:
            raise TokenError("token not yet valid")
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.startswith(SUBJECT_PREFIX):
            raise TokenError("token subject is not a service account")
        ns, sep, sa = sub[len(SUBJECT_PREFIX) :].partition(":")
        try:
            check_namespace(ns)
            check_service_account(sa)
        except IdentityError as e:
            raise TokenError("token subject is not a valid service account") from e
        if not sep:
            raise TokenError("token subject is not a service account")
        jti = claims.get("jti")
        return TokenClaims(ns, sa, iat, exp, jti if isinstance(jti, str) else "")
