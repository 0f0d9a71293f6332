"""CA material from Kubernetes Secrets, as istiod reads it in a cluster.

What Istio does (pilot/pkg/bootstrap/istio_ca.go, security/pkg/pki/ca/ca.go):

- a Secret `cacerts` in the system namespace makes a plug-in CA; its keys are the
  plug-in files' names (ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem);
- else the self-signed root is kept in Secret `istio-ca-secret` (type
  `istio.io/ca-root`, keys ca-cert.pem and ca-key.pem, with cert-chain.pem and
  root-cert.pem beside them). The first replica to find it absent generates a root and
  creates the Secret; a create that fails with 409 AlreadyExists means another replica
  won the race, and its Secret is read, so every replica signs with the same root.

meshpilot builds the same in-memory CertificateAuthority as from a CA directory, with
the same checks; errors name the Secret and key (`Secret istio-system/cacerts key
ca-key.pem: ...`). Where Istio writes the generated key to istio-ca-secret but leaves
root-cert.pem empty, meshpilot writes the root there too (readers accept either).
Transient API errors (unreachable, 429, 5xx) are retried with backoff until `give_up_after`;
403 (RBAC) and malformed material fail at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping

import aiohttp
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes_asyncio.client import ApiClient, CoreV1Api, V1ObjectMeta, V1Secret
from kubernetes_asyncio.client.exceptions import ApiException

from meshpilot.ca.authority import (
    DEFAULT_MAX_TTL,
    DEFAULT_TTL,
    CertificateAuthority,
    self_signed_root,
)
from meshpilot.ca.cadir import CA_CERT, CA_KEY, CERT_CHAIN, PLUGIN_FILES, ROOT_CERT, SecretKeys
from meshpilot.ca.csr import CAConfigError
from meshpilot.ca.identity import check_trust_domain
from meshpilot.kube.backoff import Backoff

log = structlog.get_logger(__name__)

PLUGIN_SECRET = "cacerts"
SELF_SIGNED_SECRET = "istio-ca-secret"
SELF_SIGNED_TYPE = "istio.io/ca-root"
# Far above any real chain; a Secret is at most 1 MiB on the server anyway.
MAX_KEY_BYTES = 256 * 1024
DEFAULT_TIMEOUT = 300.0


class CAUnavailable(Exception):
    """The API server did not answer in time; the message names the Secret."""


async def load_ca_from_secrets(
    api: ApiClient,
    namespace: str = "istio-system",
    trust_domain: str = "cluster.local",
    *,
    default_ttl: float = DEFAULT_TTL,
    max_ttl: float = DEFAULT_MAX_TTL,
    give_up_after: float = DEFAULT_TIMEOUT,
    backoff: Backoff | None = None,
    create: bool = True,
) -> CertificateAuthority:
    """The plug-in CA of `cacerts`, else the shared self-signed root of `istio-ca-secret`
    (created if absent, unless `create` is False: then wait for another replica to
    create it, as Istio's read-signing-cert-only mode does). Raises CAConfigError for
    bad material, CAUnavailable when the API server cannot be reached (or, with
    `create=False`, the Secret does not appear) within `give_up_after` seconds."""
    check_trust_domain(trust_domain)
    kw = {"default_ttl": default_ttl, "max_ttl": max_ttl}
    loader = _Loader(CoreV1Api(api), namespace, backoff or Backoff())
    try:
        async with asyncio.timeout(give_up_after):
            plugin = await loader.get(PLUGIN_SECRET)
            if plugin is not None:
                where = SecretKeys(namespace, PLUGIN_SECRET)
                pems = _pems(plugin, where, PLUGIN_FILES, PLUGIN_FILES)
                ca = CertificateAuthority.from_plugin_pems(
                    pems, where, trust_domain, default_ttl=default_ttl, max_ttl=max_ttl
                )
            else:
                ca = await _self_signed(loader, namespace, trust_domain, kw, create)
    except TimeoutError:
        raise CAUnavailable(
            f"Secret {namespace}/{PLUGIN_SECRET} or {namespace}/{SELF_SIGNED_SECRET}: "
            f"not available within {give_up_after:g}s (API server unreachable"
            f"{'' if create else ', or no replica created the root'})"
        ) from None
    log.info(
        "ca loaded",
        mode=ca.mode,
        secret=f"{namespace}/{PLUGIN_SECRET if ca.mode == 'plug-in' else SELF_SIGNED_SECRET}",
        trust_domain=trust_domain,
        issuer=ca.signing_cert.subject.rfc4514_string(),
        not_after=ca.not_after.isoformat(),
    )
    return ca


async def _self_signed(
    loader: _Loader, namespace: str, trust_domain: str, kw: Mapping[str, float], create: bool
) -> CertificateAuthority:
    where = SecretKeys(namespace, SELF_SIGNED_SECRET)
    existing = await loader.get(SELF_SIGNED_SECRET)
    while existing is None and not create:
        log.info("ca waiting for another replica to create the root", secret=str(where))
        await asyncio.sleep(loader.backoff.next())
        existing = await loader.get(SELF_SIGNED_SECRET)
    if existing is None:
        created = _new_root(trust_domain)
        if await loader.create(SELF_SIGNED_SECRET, created):
            log.info("ca self-signed root created", secret=str(where), trust_domain=trust_domain)
            return _from_self_signed(created, where, trust_domain, kw)
        # Another replica created it between our read and our create: use theirs.
        log.info("ca self-signed root created by another replica", secret=str(where))
        existing = await loader.get(SELF_SIGNED_SECRET)
        if existing is None:
            raise CAConfigError(f"{where}: created by another replica, then deleted")
    pems = _pems(existing, where, (CA_CERT, CA_KEY), (CA_CERT, CA_KEY, ROOT_CERT))
    return _from_self_signed(pems, where, trust_domain, kw)


def _from_self_signed(
    pems: Mapping[str, bytes], where: SecretKeys, trust_domain: str, kw: Mapping[str, float]
) -> CertificateAuthority:
    # Istio's own istio-ca-secret leaves root-cert.pem empty: the root is ca-cert.pem.
    full = dict(pems)
    if not full.get(ROOT_CERT, b"").strip():
        full[ROOT_CERT] = full[CA_CERT]
    return CertificateAuthority.from_self_signed_pems(
        full,
        where,
        trust_domain,
        default_ttl=kw["default_ttl"],
        max_ttl=kw["max_ttl"],
    )


def _new_root(trust_domain: str) -> dict[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed_root(key, trust_domain).public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return {CA_CERT: cert, CA_KEY: key_pem, CERT_CHAIN: b"", ROOT_CERT: cert}


def _pems(
    secret: V1Secret,
    where: SecretKeys,
    required: tuple[str, ...],
    wanted: tuple[str, ...],
) -> dict[str, bytes]:
    data: Mapping[str, str] = secret.data or {}
    missing = [k for k in required if not data.get(k)]
    if missing:
        raise CAConfigError(
            f"{where}: missing {', '.join(missing)}; it needs {', '.join(required)}"
        )
    out: dict[str, bytes] = {}
    for key in wanted:
        if key not in data:
            continue
        value = data[key] or ""
        if len(value) > MAX_KEY_BYTES * 4 // 3 + 4:
            raise CAConfigError(f"{where / key}: larger than {MAX_KEY_BYTES} bytes")
        try:
            out[key] = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise CAConfigError(f"{where / key}: not base64: {e}") from e
    return out


class _Loader:
    """Secret reads and creates, retried with backoff while the API server is away."""

    def __init__(self, core: CoreV1Api, namespace: str, backoff: Backoff) -> None:
        self._core = core
        self._namespace = namespace
        self.backoff = backoff

    async def get(self, name: str) -> V1Secret | None:
        while True:
            try:
                secret: V1Secret = await self._core.read_namespaced_secret(name, self._namespace)
                return secret
            except ApiException as e:
                if e.status == 404:
                    return None
                await self._wait_or_raise(name, e)
            except (aiohttp.ClientError, OSError) as e:
                await self._wait_or_raise(name, e)

    async def create(self, name: str, pems: Mapping[str, bytes]) -> bool:
        """True if we created it; False if it already existed (409)."""
        body = V1Secret(
            api_version="v1",
            kind="Secret",
            type=SELF_SIGNED_TYPE,
            metadata=V1ObjectMeta(name=name, namespace=self._namespace),
            data={k: base64.b64encode(v).decode() for k, v in pems.items()},
        )
        while True:
            try:
                await self._core.create_namespaced_secret(self._namespace, body)
                return True
            except ApiException as e:
                if e.status == 409:
                    return False
                await self._wait_or_raise(name, e)
            except (aiohttp.ClientError, OSError) as e:
                await self._wait_or_raise(name, e)

    async def _wait_or_raise(self, name: str, e: Exception) -> None:
        where = f"Secret {self._namespace}/{name}"
        if isinstance(e, ApiException) and not (e.status == 429 or (e.status or 0) >= 500):
            # 401/403/422...: waiting will not help; say what was refused.
            raise CAConfigError(f"{where}: the API server refused: {e.status} {e.reason}") from e
        delay = self.backoff.next()
        error = f"{e.status} {e.reason}" if isinstance(e, ApiException) else str(e)
        log.warning("ca secret not readable yet; retrying", secret=where, error=error)
        await asyncio.sleep(delay)
